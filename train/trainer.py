"""The trainer: any zoo model on any memory task, on one CPU or many hosts.

``Trainer(config, workdir).fit()`` does, in order:

1. validates the whole config before anything is compiled (ValueErrors name the
   field: ``model.preset``, ``mesh.fsdp``, ``train.batch_size``, ``task.seq_len``, ...);
2. builds the mesh (``data``, ``fsdp``, ``tensor``), prepares the task's TFDS dataset
   (process 0 generates it, the others wait), and the model sized to the task;
3. initialises the train state directly into its shardings (parameters and
   optimizer state sharded by their logical axes), or restores the newest readable
   checkpoint onto this mesh;
4. runs jitted train steps with in/out shardings, logging, held-out evaluation every
   ``eval.every_steps``, async checkpoints every ``checkpoint.every_steps``;
5. writes a final checkpoint and a release bundle (``<workdir>/release``);
6. returns a :class:`FitResult`: the final :class:`TrainState` (step, parameters,
   optimizer state, sharded over the trainer's mesh) and the metrics.

Loss: cross-entropy of the model's per-step outputs at the task's masked steps
(mean over those steps); accuracy: the fraction of masked steps whose argmax is the
target (for MQAR, the recall accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

import mnemax
from mnemax.configs.base import base_config
from mnemax.layers import NO_WEIGHT_DECAY, weight_decay_mask
from mnemax.release import example_inputs
from mnemax.sharding import batch_sharding, kernel_sharding, make_mesh, resolve_mesh_shape, tree_shardings

from . import tasks as tasks_lib
from .checkpoint import Checkpointer
from .data import Feeder
from .metrics import MetricsWriter


class TrainingDivergedError(RuntimeError):
    """More steps than ``train.max_nonfinite_steps`` had a non-finite loss, gradient or update."""


def all_finite(tree) -> jax.Array:
    """True iff every float leaf of ``tree`` is finite (a scalar bool array; jit-able)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@flax.struct.dataclass
class TrainState:
    """What a train step updates (and a checkpoint holds): the number of steps taken, the
    model's parameters (the ``"params"`` collection) and the optax optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :meth:`Trainer.fit` returns.

    ``state``: the final train state, the one the last checkpoint and the release bundle
    hold (``state.step == train.steps``), its arrays sharded over the trainer's mesh as
    ``Trainer.state_shardings`` says. ``metrics``: the last logged training metrics
    (``loss``, ``accuracy``, ``grad_norm``, ``nonfinite_steps``, ``tokens_per_s``; absent
    when a resumed run had no step left to train) and the final held-out ones
    (``eval_loss``, ``eval_accuracy``, ``eval_accuracy/<group>``)."""

    state: TrainState
    metrics: dict[str, float]


def default_data_dir() -> str:
    return os.environ.get("MNEMAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), "mnemax_datasets")


def _to_dict(cfg) -> dict:
    return cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)


def _jsonable(tree):
    """``tree`` as JSON gives it back (tuples -> lists), so stored and live configs compare equal."""
    return json.loads(json.dumps(tree, sort_keys=True, default=str))


# What a resume must not change silently (checkpoint.allow_changes names the exceptions);
# where the data lives, logging, evaluation, checkpointing, the mesh and the release may change.
RESUME_CHECKED = ("seed", "model", "task", "train")
RESUME_FREE = ("task.data_dir", "train.max_nonfinite_steps")


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def config_changes(stored: dict, now: dict) -> list[dict]:
    """The fields of ``RESUME_CHECKED`` sections that differ between a checkpoint's config and this
    run's: ``[{"field", "checkpoint", "now"}]`` (absent values are None)."""
    a, b = _flatten(_jsonable(stored or {})), _flatten(_jsonable(now))
    defaults = _flatten(_jsonable(base_config().to_dict()))
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] not in RESUME_CHECKED or key in RESUME_FREE:
            continue
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue  # a field newer than the checkpoint, at its default
        if a.get(key) != b.get(key):
            out.append({"field": key, "checkpoint": a.get(key), "now": b.get(key)})
    return out


# ----------------------------------------------------------------------------- validation


def model_config(config, spec: tasks_lib.TaskSpec) -> mnemax.ModelConfig:
    """The zoo config for ``config.model`` sized to the task (ValueErrors name the field)."""
    preset = config.model.preset
    if preset not in mnemax.list_models():
        raise ValueError(f"model.preset: unknown model {preset!r}; available: {mnemax.list_models()}")
    overrides = _to_dict(config.model.get("overrides", {}))
    task_fields = spec.model_overrides()
    clash = sorted(k for k in overrides if k in task_fields and overrides[k] != task_fields[k])
    if clash:
        raise ValueError(
            f"model.overrides.{clash[0]}: set by the task ({task_fields[clash[0]]!r}); remove it from the model overrides"
        )
    try:
        cfg = mnemax.get_config(preset, **{**overrides, **task_fields})
    except ValueError as err:
        raise ValueError(f"model.overrides: {err}") from None
    window = cfg.block.get("window")
    if isinstance(window, int) and window < spec.seq_len:
        raise ValueError(
            f"task.seq_len: sequences of {spec.seq_len} steps are too long for the model's attention window "
            f"of {window} (model.overrides.window); the model could not see the whole sequence"
        )
    return cfg


def check_field(node, name: str, *, low=None, high=None, low_open=False, high_open=False, integer=False,
                allowed=()) -> None:
    """ValueError naming ``name`` (``section.key``) unless ``node[key]`` is a finite number in
    range (``low``/``high`` inclusive unless ``*_open``), an integer where ``integer``, or one of
    ``allowed``."""
    value = node[name.rsplit(".", 1)[-1]]
    if not isinstance(value, bool) and value in allowed:
        return
    rng = []
    if low is not None:
        rng.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        rng.append(f"{'<' if high_open else '<='} {high}")
    want = ("an integer" if integer else "a finite number") + (" " + " and ".join(rng) if rng else "")
    if allowed:
        want += f" (or one of {list(allowed)})"
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
    ok = ok and bool(np.isfinite(value)) and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name}: must be {want}, got {value!r}")


def check_numbers(config) -> None:
    """Every numeric field of the train, eval, checkpoint, log and task sections, and the seed."""
    t, e, c, lg, task = config.train, config.eval, config.checkpoint, config.log, config.task
    check_field(config, "seed", low=0, integer=True)
    check_field(t, "train.steps", low=1, integer=True)
    check_field(t, "train.batch_size", low=1, integer=True)
    check_field(t, "train.learning_rate", low=0, low_open=True)
    check_field(t, "train.warmup_steps", low=0, integer=True)
    check_field(t, "train.weight_decay", low=0)
    check_field(t, "train.grad_clip", low=0)  # 0: no clipping
    check_field(t, "train.b1", low=0, high=1, high_open=True)
    check_field(t, "train.b2", low=0, high=1, high_open=True)
    check_field(t, "train.max_nonfinite_steps", low=0, integer=True)
    if t.schedule not in ("cosine", "constant"):
        raise ValueError(f"train.schedule: must be 'cosine' or 'constant', got {t.schedule!r}")
    check_field(e, "eval.every_steps", low=0, integer=True)  # 0: only at the end
    check_field(e, "eval.batch_size", low=1, integer=True)
    check_field(e, "eval.num_examples", low=1, integer=True, allowed=(-1,))  # -1: the whole test split
    check_field(c, "checkpoint.every_steps", low=0, integer=True)  # 0: only at the end
    check_field(c, "checkpoint.keep", low=1, integer=True)
    check_field(lg, "log.every_steps", low=1, integer=True)
    check_field(task, "task.num_train", low=1, integer=True)
    check_field(task, "task.num_test", low=1, integer=True)
    check_field(task, "task.seed", low=0, integer=True)


def validate(config, *, num_devices: int) -> dict:
    """Checks every field that can be checked before compiling; returns resolved pieces."""
    for field in ("model", "task", "train", "eval", "mesh", "checkpoint", "log"):
        if field not in config:
            raise ValueError(f"{field}: missing section in the config")
    check_numbers(config)
    t = config.train
    mesh_cfg = _to_dict(config.mesh)
    n_use = mesh_cfg.pop("num_devices", -1)
    if n_use == -1:
        n_use = num_devices
    if not 1 <= n_use <= num_devices:
        raise ValueError(f"mesh.num_devices: must be -1 or in [1, {num_devices}], got {n_use}")
    if jax.process_count() > 1 and n_use != num_devices:
        raise ValueError(f"mesh.num_devices: a multi-process run uses every device ({num_devices}), got {n_use}")
    shape = resolve_mesh_shape(mesh_cfg, n_use)
    rows = shape["data"] * shape["fsdp"]
    for field, bs in (("train.batch_size", t.batch_size), ("eval.batch_size", config.eval.batch_size)):
        if bs < 1 or bs % rows:
            raise ValueError(
                f"{field}: {bs} is not divisible by the data-parallel size data*fsdp = {shape['data']}*{shape['fsdp']} = {rows}"
            )
    task = config.task
    if task.name not in tasks_lib.TASK_NAMES:
        raise ValueError(f"task.name: unknown task {task.name!r}; tasks are {tasks_lib.TASK_NAMES}")
    params = _to_dict(task.get("params", {}))
    if task.name == "tfds":
        spec = None  # checked when the dataset is opened (it must exist on disk)
    else:
        spec = tasks_lib.make_task(task.name, **params).spec()
    cfg = model_config(config, spec) if spec is not None else None
    return {"mesh_shape": shape, "num_devices": n_use, "model_config": cfg, "spec": spec}


# ----------------------------------------------------------------------------- steps


def make_optimizer(config) -> optax.GradientTransformation:
    t = config.train
    if t.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * 0.01)
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1)), optax.constant_schedule(t.learning_rate)], [max(t.warmup_steps, 1)])

    no_decay = frozenset() if t.get("decay_dynamics", False) else NO_WEIGHT_DECAY

    def decay_mask(params):
        return weight_decay_mask(params, no_decay)

    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask),
    )


def masked_metrics(logits, targets, mask, group=None, num_groups: int = 0):
    """Sums over masked steps: nll, correct, count (and per-group correct/count)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * m
    out = {"nll": jnp.sum(nll * m), "correct": jnp.sum(correct), "count": jnp.sum(m)}
    if num_groups:
        onehot = jax.nn.one_hot(group, num_groups)  # (batch, groups)
        out["group_correct"] = jnp.einsum("bt,bg->g", correct, onehot)
        out["group_count"] = jnp.einsum("bt,bg->g", m, onehot)
    return out


def accumulate_eval(step_fn, batches, group_names) -> dict:
    """Sums ``masked_metrics`` over ``batches`` and turns them into held-out metrics."""
    totals = None
    for batch in batches:
        out = step_fn(batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), totals)
    count = max(float(totals["count"]), 1.0)
    result = {"eval_loss": float(totals["nll"]) / count, "eval_accuracy": float(totals["correct"]) / count}
    for i, name in enumerate(group_names):
        c = float(totals["group_count"][i])
        if c:
            result[f"eval_accuracy/{name}"] = float(totals["group_correct"][i]) / c
    return result


class Trainer:
    """Trains ``config`` (see ``mnemax.configs.base``) in ``workdir``: :meth:`fit`.

    Public attributes, set up by the constructor (before anything is trained): ``mesh``,
    ``model`` (the flax module) and ``model_config``, ``spec`` (the task's
    :class:`~mnemax.train.tasks.TaskSpec`), ``feeder`` (the sharded batches),
    ``state_shardings`` / ``abstract_state`` (the train state's shardings, and its shapes
    with them: what ``Checkpointer.restore_latest`` restores onto this mesh), and the
    jitted ``train_step(state, batch, nonfinite)`` / ``eval_step(params, batch)``; methods
    :meth:`init_state` (a fresh state from ``seed``) and :meth:`evaluate` (held-out metrics
    of any parameters on this mesh).
    """

    def __init__(self, config, workdir: str, devices=None):
        """``devices``: the devices to build the mesh from (default ``jax.devices()``), e.g.
        ``jax.devices("cpu")`` to train on simulated CPU devices beside an accelerator."""
        self.config = config
        self.workdir = os.path.abspath(workdir)
        pool = list(jax.devices() if devices is None else devices)
        resolved = validate(config, num_devices=len(pool))
        devices = pool[: resolved["num_devices"]]
        self.mesh = make_mesh(resolved["mesh_shape"], devices)
        self.is_main = jax.process_index() == 0
        data_dir = config.task.get("data_dir") or default_data_dir()
        self.task_source = self._open_task(data_dir)
        self.spec = self.task_source.spec()
        self.model_config = resolved["model_config"] or model_config(config, self.spec)
        # the Pallas kernels run per shard over the mesh's batch and tensor axes (told, not guessed)
        self.model = mnemax.build(self.model_config, kernel_sharding=kernel_sharding(self.mesh))
        self.tx = make_optimizer(config)
        self.feeder = Feeder(self.task_source, self.mesh, batch_size=config.train.batch_size, seed=config.seed)
        self._build_state_shardings()
        self._build_steps()

    # -- setup ------------------------------------------------------------------------------
    def _open_task(self, data_dir):
        t = self.config.task
        kw = dict(num_train=t.num_train, num_test=t.num_test, seed=t.seed, data_dir=data_dir)
        params = _to_dict(t.get("params", {}))
        if self.is_main:
            src = tasks_lib.open_task(t.name, params, **kw)
        multihost_utils.sync_global_devices("mnemax:data-prepared")
        if not self.is_main:
            src = tasks_lib.open_task(t.name, params, **kw)
        return src

    def _init_boxed(self, rng):
        variables = self.model.init(rng, example_inputs(self.model_config))
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def _build_state_shardings(self):
        boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        self.state_shardings = tree_shardings(boxed, self.mesh)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed), self.state_shardings
        )

    def init_state(self) -> TrainState:
        def init(rng):
            return nn.meta.unbox(self._init_boxed(rng))

        return jax.jit(init, out_shardings=self.state_shardings)(jax.random.key(self.config.seed))

    def _build_steps(self):
        model, tx = self.model, self.tx
        groups = len(self.spec.group_names)

        mesh = self.mesh.abstract_mesh

        def loss_fn(params, batch):
            with jax.sharding.use_abstract_mesh(mesh):  # activations' rows over (data, fsdp): mnemax.sharding.constrain_rows
                logits, _ = model.apply({"params": params}, batch["inputs"])
            m = masked_metrics(logits, batch["targets"], batch["mask"])
            return m["nll"] / jnp.maximum(m["count"], 1.0), m

        def train_step(state: TrainState, batch, nonfinite):
            """One optimizer step; a step whose loss, gradients or updates are not all finite
            leaves the parameters and optimizer state as they were and adds 1 to ``nonfinite``."""
            (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            grad_norm = optax.tree.norm(grads)
            finite = all_finite((loss, grads, updates))  # (a norm could overflow where no element is inf)
            params, opt_state = jax.lax.cond(  # one branch taken: no per-leaf select of old and new
                finite,
                lambda: (optax.apply_updates(state.params, updates), opt_state),
                lambda: (state.params, state.opt_state),
            )
            metrics = {
                "loss": loss,
                "accuracy": m["correct"] / jnp.maximum(m["count"], 1.0),
                "grad_norm": grad_norm,
                "nonfinite_steps": nonfinite + (1 - finite.astype(jnp.int32)),
            }
            return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

        def eval_step(params, batch):
            with jax.sharding.use_abstract_mesh(mesh):
                logits, _ = model.apply({"params": params}, batch["inputs"])
            return masked_metrics(logits, batch["targets"], batch["mask"], batch["group"], groups)

        batch_shard = {
            "inputs": batch_sharding(self.mesh, 2 if self.spec.input_dim is None else 3),
            "targets": batch_sharding(self.mesh, 2),
            "mask": batch_sharding(self.mesh, 2),
            "group": batch_sharding(self.mesh, 1),
        }
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.state_shardings, batch_shard, replicated),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self.state_is_finite = jax.jit(all_finite, in_shardings=(self.state_shardings,), out_shardings=replicated)
        self.eval_step = jax.jit(
            eval_step, in_shardings=(self.state_shardings.params, batch_shard), out_shardings=replicated
        )

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, params) -> dict:
        n = self.config.eval.get("num_examples", -1)
        batches = self.feeder.eval_batches(self.config.eval.batch_size, None if n in (-1, None) else n)
        return accumulate_eval(lambda batch: self.eval_step(params, batch), batches, self.spec.group_names)

    # -- the run --------------------------------------------------------------------------
    def _restore(self, checkpointer: Checkpointer, config_dict: dict):
        """``(start step, state, changes)``: the newest good checkpoint's, checked against this
        config, or step 0 and a fresh state. ``changes`` lists the allowed config changes."""
        ck = self.config.checkpoint
        restored = checkpointer.restore_latest(
            self.abstract_state, accept=lambda state: bool(self.state_is_finite(state)),
            restart_if_corrupt=bool(ck.get("restart_if_corrupt", False)),
        )
        total = self.config.train.steps
        if restored is None:
            return 0, self.init_state(), []
        start, state, stored = restored
        if start > total:
            # resuming would train nothing and report the other run's model as this one's
            raise ValueError(
                f"train.steps: {self.workdir} holds a checkpoint at step {start}, beyond train.steps={total}; "
                "use a fresh --workdir (or train.steps >= that step to resume it)"
            )
        changes = config_changes(stored, config_dict)
        allowed = [a.strip() for a in str(ck.get("allow_changes", "")).split(",") if a.strip()]
        refused = [c for c in changes if not any(c["field"] == a or c["field"].startswith(a + ".") for a in allowed)]
        if refused:
            listing = "; ".join(f"{c['field']}: {c['checkpoint']!r} -> {c['now']!r}" for c in refused)
            raise ValueError(
                f"checkpoint.allow_changes: the checkpoint at step {start} in {self.workdir} was trained under another "
                f"config ({listing}). Resume with the same config, use another --workdir, or allow the changes with "
                f"--config.checkpoint.allow_changes={','.join(c['field'] for c in refused)}"
            )
        if self.is_main:
            print(f"resumed from the checkpoint at step {start}", flush=True)
            for c in changes:
                print(f"  with {c['field']} changed: {c['checkpoint']!r} -> {c['now']!r} (allowed)", flush=True)
        return start, state, [{**c, "step": start} for c in changes]

    def fit(self) -> FitResult:
        """Trains (or resumes) to ``train.steps``, evaluates, checkpoints and releases; returns
        the final train state and the metrics (:class:`FitResult`).

        Raises:
          ValueError: the checkpoint does not fit this config (see ``checkpoint.allow_changes``).
          CheckpointCorruptError: no checkpoint is good (see ``checkpoint.restart_if_corrupt``).
          TrainingDivergedError: more than ``train.max_nonfinite_steps`` steps were non-finite.
        """
        cfg = self.config
        config_dict = _jsonable(_to_dict(cfg))
        if self.is_main:
            os.makedirs(self.workdir, exist_ok=True)
        ck = cfg.checkpoint
        checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=ck.keep, every_steps=ck.every_steps, use_async=ck.use_async)
        try:
            start, state, self.config_changes = self._restore(checkpointer, config_dict)
        except BaseException:
            checkpointer.close()
            raise
        total = cfg.train.steps
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
        writer = MetricsWriter(
            self.workdir, enabled=self.is_main, tensorboard=cfg.log.tensorboard, progress_bar=cfg.log.progress_bar,
            total_steps=total, start_step=start,
        )
        tokens_per_step = cfg.train.batch_size * self.spec.seq_len
        max_bad = cfg.train.get("max_nonfinite_steps", 10)
        nonfinite = jax.device_put(jnp.zeros((), jnp.int32), jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        last: dict = {}
        eval_result: dict = {}
        t_window, steps_window = time.time(), 0
        try:
            if start < total:
                for step, batch in self.feeder.train_batches(start):
                    if step >= total:
                        break
                    state, metrics = self.train_step(state, batch, nonfinite)
                    nonfinite = metrics["nonfinite_steps"]
                    done = step + 1
                    steps_window += 1
                    if done % cfg.log.every_steps == 0 or done == total:
                        metrics = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}
                        elapsed = max(time.time() - t_window, 1e-9)
                        metrics["tokens_per_s"] = tokens_per_step * steps_window / elapsed
                        t_window, steps_window = time.time(), 0
                        writer.write(done, metrics, console=cfg.log.get("console", True))
                        last = metrics
                        if metrics["nonfinite_steps"] > max_bad:
                            raise TrainingDivergedError(
                                f"train.max_nonfinite_steps: {int(metrics['nonfinite_steps'])} of the steps "
                                f"{start + 1}..{done} had a non-finite loss, gradient or update and were skipped "
                                f"(limit {max_bad}); stopped at step {done} without writing a checkpoint or release. "
                                f"The last checkpoint in {checkpointer.directory} (if any) holds finite values; try a lower "
                                "train.learning_rate or a grad_clip"
                            )
                    writer.progress(done, {k: last[k] for k in ("loss", "accuracy", "tokens_per_s") if k in last})
                    if cfg.eval.every_steps > 0 and done % cfg.eval.every_steps == 0 and done != total:
                        eval_result = self.evaluate(state.params)
                        writer.write(done, eval_result)
                    if checkpointer.should_save(done):
                        self._save(checkpointer, done, state, config_dict)
            # the final checkpoint before the final evaluation: an evaluation error loses no training
            self._save(checkpointer, total, state, config_dict, force=True)
            checkpointer.wait()
            eval_result = self.evaluate(state.params)
            writer.write(total, eval_result)
            if cfg.get("release", {}).get("write", True):
                self.release(state, eval_result)
        finally:
            checkpointer.close()
            writer.close()
        return FitResult(state=state, metrics={**last, **eval_result})

    def _save(self, checkpointer: Checkpointer, step: int, state: TrainState, config_dict: dict, force: bool = False):
        # The state is finite by construction: a fresh init, a restore that passed the finiteness
        # check, or train steps whose guard keeps the old values when a step is not finite.
        checkpointer.save(step, state, config_dict, force=force)

    def release(self, state: TrainState, eval_result: dict) -> str:
        extra = {
            "task": _to_dict(self.config.task),
            "trained_steps": int(np.asarray(state.step.addressable_data(0))),
            "eval": eval_result,
            "config": _jsonable(_to_dict(self.config)),  # the config that was trained
            "config_changes": getattr(self, "config_changes", []),  # allowed changes at a resume
        }
        path = os.path.join(self.workdir, "release")
        mnemax.save_pretrained(path, self.model, {"params": state.params}, extra=extra, overwrite=True)
        if self.is_main:
            print(f"release bundle written to {path}", flush=True)
        return path
