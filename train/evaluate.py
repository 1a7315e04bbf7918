"""Evaluate a release bundle on the held-out split of the task it was trained on.

    python -m mnemax.train.evaluate --release=runs/mqar/release [--data_dir=...] [--batch_size=256]
    python -m mnemax.train.evaluate --release=runs/mqar          # a training workdir: uses runs/mqar/release
    python -m mnemax.train.evaluate --release=runs/passkey/release --task_param=seq_len=1024

Prints the held-out loss and accuracy (and per-group accuracy, e.g. by needle depth),
computed exactly as the trainer computes them. The task (name, parameters, sizes, seed)
is read from the bundle's ``config.json`` (``extra.task``); its dataset is regenerated
locally if missing.

``--release`` is a bundle, or a training workdir: the trainer writes its bundle to
``<workdir>/release``, and that is used when the path itself is not a bundle (if neither
is one, the error names both paths checked).

The dataset directory (where a missing dataset is generated, i.e. written) is never taken
from the bundle: it is ``--data_dir`` / ``data_dir=``, else ``$MNEMAX_DATA_DIR``, else
``mnemax.train.trainer.default_data_dir()``. A bundle's recorded ``extra.task.data_dir``
(and a ``data_dir`` among the task's parameters) is ignored.

``--batch_size`` / ``batch_size=`` (a positive integer, default 256) is the evaluation
batch; the last batch is padded with masked-out rows, so the metrics do not depend on it.
Sequences longer than ``--time_chunk`` (default 1024) run in pieces of that many steps
with the model's state carried between them, so a long-context evaluation (the windowed
Transformer at 4096 steps, passkey at 16x its training length) needs the memory of a
1024-step call.
``--task_param=name=value`` (repeatable) changes one of the task's parameters, e.g. a
longer context than the model was trained at; the changed task's test split is generated
with the training seed (no training split is built).
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os

import jax
import jax.numpy as jnp
from absl import app, flags

import mnemax
from mnemax.release import CHECKSUMS, FORMAT, ReleaseError, read_config
from mnemax.sharding import make_mesh

from . import tasks as tasks_lib
from .data import Feeder
from .trainer import accumulate_eval, default_data_dir, masked_metrics

DEFAULT_BATCH_SIZE = 256
# Sequences longer than this are evaluated in pieces with the state carried (the layer
# contract): a 4096-step passkey/MQAR evaluation then needs the memory of 1024 steps.
DEFAULT_TIME_CHUNK = 1024


def check_batch_size(batch_size, name: str = "batch_size") -> int:
    """``batch_size`` as an int; ValueError naming it (``name``) unless it is a positive integer."""
    if isinstance(batch_size, bool):
        raise ValueError(f"{name}: must be a positive integer, got {batch_size!r}")
    try:
        value = operator.index(batch_size)
    except TypeError:
        raise ValueError(f"{name}: must be a positive integer, got {batch_size!r} ({type(batch_size).__name__})") from None
    if value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value}")
    return value


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """The dataset directory: ``data_dir``, else ``$MNEMAX_DATA_DIR``, else the trainer's
    default. Never anything recorded in a bundle."""
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if not data_dir:
            raise ValueError("data_dir: empty path; leave it out to use $MNEMAX_DATA_DIR or the default")
        return os.path.abspath(data_dir)
    return os.path.abspath(os.environ.get("MNEMAX_DATA_DIR") or default_data_dir())


def _is_bundle(path: str) -> bool:
    if os.path.isfile(os.path.join(path, CHECKSUMS)):
        return True
    try:
        return read_config(path).get("format") == FORMAT
    except (OSError, ReleaseError):
        return False


def find_release(path: str | os.PathLike) -> str:
    """The release bundle ``path`` names: ``path`` itself if it is a bundle, else
    ``<path>/release`` (where the trainer writes the bundle of a workdir)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"release: {path!r} does not exist or is not a directory")
    if _is_bundle(path):
        return path
    inner = os.path.join(path, "release")
    if os.path.isdir(inner):
        return inner
    raise FileNotFoundError(
        f"release: no release bundle at {path!r} (it has no {CHECKSUMS} or {FORMAT} config.json) and no {inner!r}. "
        "The trainer writes a run's bundle to <workdir>/release at the end of training (release.write=True); "
        "pass that directory, or the workdir that holds it"
    )


def _recorded_task(path: str) -> dict:
    extra = read_config(path).get("extra")
    task = extra.get("task") if isinstance(extra, dict) else None
    if not task:
        raise ValueError(f"release {path!r} records no training task (config.json extra.task); evaluate it yourself")
    missing = [k for k in ("name", "num_train", "num_test", "seed") if not isinstance(task, dict) or k not in task]
    if missing:
        raise ReleaseError(f"config.json in {path!r}: extra.task lacks {missing}")
    return task


def evaluate_release(path: str, *, data_dir: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, mesh=None,
                     task_params: dict | None = None, time_chunk: int | None = DEFAULT_TIME_CHUNK) -> dict:
    """Loads the bundle at ``path`` (or ``<path>/release`` for a training workdir) and
    evaluates it on its task's test split.

    ``data_dir``: where the dataset is read or generated (default ``$MNEMAX_DATA_DIR``,
    else the trainer's default; never the bundle's recorded one). ``batch_size``: a
    positive integer. ``task_params``: task parameters to change (e.g. ``{"seq_len":
    1024}`` for a longer context); names must be parameters of the bundle's task.
    ``time_chunk``: sequences longer than this are run in pieces of it with the state
    carried (:func:`streaming_eval_step`; None: one call).
    Returns the metrics dict (``eval_loss``, ``eval_accuracy``, ``eval_accuracy/<group>``)."""
    batch_size = check_batch_size(batch_size)
    if time_chunk is not None:
        time_chunk = check_batch_size(time_chunk, "time_chunk")
    data_dir = resolve_data_dir(data_dir)
    path = find_release(path)
    _recorded_task(path)  # fail before loading the parameters
    mesh = mesh or make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model, params_ = mnemax.load_pretrained(path, mesh=mesh)  # verifies every checksum, config.json included
    task = _recorded_task(path)  # the verified copy
    params, num_train = dict(task.get("params", {})), task["num_train"]
    params.pop("data_dir", None)  # a tfds task's own data_dir: the bundle does not choose directories
    if task_params:
        if task["name"] not in tasks_lib.BUILDERS:
            raise ValueError(f"task_params: only synthetic tasks take them; the release's task is {task['name']!r}")
        known = {f.name for f in dataclasses.fields(tasks_lib.BUILDERS[task["name"]].TASK.Params)}
        unknown = sorted(set(task_params) - known)
        if unknown:
            raise ValueError(f"task_params: {unknown} are not parameters of {task['name']!r}; expected some of {sorted(known)}")
        params.update(task_params)
        num_train = 1  # only the test split is read
    return evaluate_model(model, params_, task["name"], params, num_train=num_train, num_test=task["num_test"],
                          seed=task["seed"], data_dir=data_dir, mesh=mesh, batch_size=batch_size, time_chunk=time_chunk)


def evaluate_model(model, variables, task: str, task_params: dict, *, num_test: int, seed: int, data_dir: str,
                   mesh, num_train: int = 1, batch_size: int = DEFAULT_BATCH_SIZE,
                   time_chunk: int | None = DEFAULT_TIME_CHUNK) -> dict:
    """Held-out metrics of ``model`` with ``variables`` (``{"params": ...}``, placed on
    ``mesh``) on the test split of the task ``task`` with ``task_params``: the dataset with
    ``num_train`` / ``num_test`` examples and ``seed`` in ``data_dir`` (generated there if
    missing; ``num_train=1`` when only the test split is wanted, e.g. at a length the model
    was not trained at). ``batch_size`` / ``time_chunk`` as in :func:`evaluate_release`.
    Returns ``eval_loss``, ``eval_accuracy`` and ``eval_accuracy/<group>``."""
    batch_size = check_batch_size(batch_size)
    src = tasks_lib.open_task(task, task_params, num_train=num_train, num_test=num_test, seed=seed, data_dir=data_dir)
    spec = src.spec()
    feeder = Feeder(src, mesh, batch_size=batch_size, seed=0)
    step = streaming_eval_step(model, len(spec.group_names), time_chunk)
    return accumulate_eval(lambda batch: step(variables, batch), feeder.eval_batches(batch_size), spec.group_names)


def chunk_step(model, groups: int):
    """The jitted ``(params, state, chunk) -> (metric sums, state)`` of one time chunk
    (``state`` None for a sequence's first chunk)."""

    @jax.jit
    def step(params, state, chunk):
        logits, state = model.apply(params, chunk["inputs"], state)
        return masked_metrics(logits, chunk["targets"], chunk["mask"], chunk["group"], groups), state

    return step


def streaming_eval_step(model, groups: int, time_chunk: int | None = DEFAULT_TIME_CHUNK):
    """``batch -> metric sums`` over the whole sequence, run ``time_chunk`` steps at a time with
    the model's state carried between the pieces (the layer contract makes that equal to one
    call), so memory is that of a ``time_chunk``-step call whatever the sequence length;
    ``None``: one call per batch."""
    step = chunk_step(model, groups)

    def run(params, batch):
        time = batch["inputs"].shape[1]
        size = time if time_chunk is None else min(time_chunk, time)
        totals, state = None, None
        for start in range(0, time, size):
            piece = {k: (v if k == "group" else v[:, start : start + size]) for k, v in batch.items()}
            out, state = step(params, state, piece)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        return totals

    return run


FLAGS = flags.FLAGS
flags.DEFINE_string("release", None, "Path of a release bundle, or of a training workdir (its <workdir>/release is used).")
flags.DEFINE_string("data_dir", None, "Where the task's dataset is read or generated (default: $MNEMAX_DATA_DIR, "
                    "else ~/mnemax_datasets; never the directory recorded in the bundle).")
flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Evaluation batch size (a positive integer).")
flags.DEFINE_integer("time_chunk", DEFAULT_TIME_CHUNK, "Longer sequences are run in pieces of this many steps, the "
                     "model's state carried between them (memory of a time_chunk-step call).")
flags.DEFINE_multi_string("task_param", [], "name=value: change one task parameter (value parsed as JSON, else a string).")


def parse_task_params(items) -> dict:
    """``["seq_len=1024", "depth=0.5"]`` -> ``{"seq_len": 1024, "depth": 0.5}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--task_param: expected name=value, got {item!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def main(argv):
    del argv
    if FLAGS.release is None:
        raise app.UsageError("--release is required")
    try:
        batch_size = check_batch_size(FLAGS.batch_size)
        time_chunk = check_batch_size(FLAGS.time_chunk, "time_chunk")
        data_dir = resolve_data_dir(FLAGS.data_dir)
    except ValueError as err:
        raise app.UsageError(f"--{err}") from None  # "--batch_size: ...", "--data_dir: ..."
    try:
        task_params = parse_task_params(FLAGS.task_param)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    release = find_release(FLAGS.release)
    print(f"release bundle: {release}\ndata_dir: {data_dir}", flush=True)
    result = evaluate_release(release, data_dir=data_dir, batch_size=batch_size, task_params=task_params,
                              time_chunk=time_chunk)
    for k, v in sorted(result.items()):
        print(f"{k}: {v:.4f}")


if __name__ == "__main__":
    app.run(main)
