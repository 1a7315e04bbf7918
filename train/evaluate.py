"""Evaluate a release bundle on the held-out split of the task it was trained on.

    python -m mnemax.train.evaluate --release=runs/mqar/release [--data_dir=...]
    python -m mnemax.train.evaluate --release=runs/passkey/release --task_param=seq_len=1024

Prints the held-out loss and accuracy (and per-group accuracy, e.g. by needle depth),
computed exactly as the trainer computes them. The task is read from the bundle's
``config.json`` (``extra.task``); its dataset is regenerated locally if missing.
``--task_param=name=value`` (repeatable) changes one of the task's parameters, e.g. a
longer context than the model was trained at; the changed task's test split is generated
with the training seed (no training split is built).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import app, flags

import mnemax
from mnemax.sharding import make_mesh

from . import tasks as tasks_lib
from .data import Feeder
from .trainer import accumulate_eval, default_data_dir, masked_metrics


def evaluate_release(path: str, *, data_dir: str | None = None, batch_size: int = 256, mesh=None,
                     task_params: dict | None = None) -> dict:
    """Loads the bundle at ``path`` and evaluates it on its task's test split.

    ``task_params``: task parameters to change (e.g. ``{"seq_len": 1024}`` for a longer
    context); names must be parameters of the bundle's task. Returns the metrics dict
    (``eval_loss``, ``eval_accuracy``, ``eval_accuracy/<group>``)."""
    with open(os.path.join(path, "config.json")) as f:
        extra = json.load(f).get("extra", {})
    task = extra.get("task")
    if not task:
        raise ValueError(f"release {path!r} records no training task (config.json extra.task); evaluate it yourself")
    params, num_train = dict(task.get("params", {})), task["num_train"]
    if task_params:
        if task["name"] not in tasks_lib.BUILDERS:
            raise ValueError(f"task_params: only synthetic tasks take them; the release's task is {task['name']!r}")
        known = {f.name for f in dataclasses.fields(tasks_lib.BUILDERS[task["name"]].TASK.Params)}
        unknown = sorted(set(task_params) - known)
        if unknown:
            raise ValueError(f"task_params: {unknown} are not parameters of {task['name']!r}; expected some of {sorted(known)}")
        params.update(task_params)
        num_train = 1  # only the test split is read
    mesh = mesh or make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model, params_ = mnemax.load_pretrained(path, mesh=mesh)
    src = tasks_lib.open_task(
        task["name"], params, num_train=num_train, num_test=task["num_test"], seed=task["seed"],
        data_dir=data_dir or task.get("data_dir") or default_data_dir(),
    )
    spec = src.spec()
    groups = len(spec.group_names)
    feeder = Feeder(src, mesh, batch_size=batch_size, seed=0)

    @jax.jit
    def step(params, batch):
        logits, _ = model.apply(params, batch["inputs"])
        return masked_metrics(logits, batch["targets"], batch["mask"], batch["group"], groups)

    return accumulate_eval(lambda batch: step(params_, batch), feeder.eval_batches(batch_size), spec.group_names)


FLAGS = flags.FLAGS
flags.DEFINE_string("release", None, "Path of a release bundle written by the trainer.")
flags.DEFINE_string("data_dir", None, "Where the task's dataset lives (default: the one recorded at training).")
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
    result = evaluate_release(FLAGS.release, data_dir=FLAGS.data_dir, task_params=parse_task_params(FLAGS.task_param))
    for k, v in sorted(result.items()):
        print(f"{k}: {v:.4f}")


if __name__ == "__main__":
    app.run(main)
