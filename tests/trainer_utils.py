"""Shared helpers for the trainer tests: a tiny MQAR config and subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TINY = {
    "model.overrides.d_model": 32, "model.overrides.n_layers": 2, "model.overrides.num_heads": 2,
    "model.overrides.window": 32, "task.params.seq_len": 32, "task.params.num_pairs": 4,
    "task.params.vocab_size": 32, "task.num_train": 256, "task.num_test": 32, "train.steps": 5,
    "train.batch_size": 8, "train.learning_rate": 3e-3, "train.warmup_steps": 2, "eval.every_steps": 0,
    "eval.batch_size": 8, "checkpoint.every_steps": 0, "log.every_steps": 1, "log.progress_bar": False,
    "log.console": False, "release.write": False,
}


def tiny_config(data_dir: str, **changes):
    """configs/mqar.py:transformer shrunk by TINY (the same run as ``cli(*flag_overrides())``)."""
    from mnemax.configs.mqar import get_config

    c = get_config("transformer")
    c.task.data_dir = data_dir
    for key, value in {**TINY, **changes}.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def flag_overrides(**changes) -> list[str]:
    """Command-line flags that turn configs/mqar.py:transformer into tiny_config()."""
    return [f"--config.{k}={v}" for k, v in {**TINY, **changes}.items()]


def cli(workdir: str, data_dir: str, *flags: str, devices: int = 1, extra_env=None, **popen):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "mnemax.train", f"--config={ROOT}/configs/mqar.py:transformer", f"--workdir={workdir}",
           f"--config.task.data_dir={data_dir}", *flags]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, **popen)


def losses(workdir: str) -> dict[int, float]:
    """step -> training loss; a resumed run's later record of a step wins."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out


def eval_records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "eval_loss" in r]


# ----------------------------------------------------------------------------- numpy metrics


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_metrics(logits, targets, mask, group, num_groups):
    """Per-step loops over (example, step): sums of nll, hits and counts on the masked steps."""
    logp = np_log_softmax(logits)
    out = {"nll": 0.0, "correct": 0.0, "count": 0.0, "group_correct": np.zeros(num_groups), "group_count": np.zeros(num_groups)}
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if not mask[b, t]:
                continue
            hit = float(int(np.argmax(logits[b, t])) == int(targets[b, t]))
            out["nll"] -= logp[b, t, targets[b, t]]
            out["correct"] += hit
            out["count"] += 1
            if num_groups:
                out["group_correct"][group[b]] += hit
                out["group_count"][group[b]] += 1
    return out


def np_reference(trainer, params, examples):
    """numpy sums of nll / hits / counts over ``examples`` (dicts of one example's arrays),
    with logits from the trainer's model applied to one example at a time."""
    model = trainer.model
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    groups = len(trainer.spec.group_names)
    sums = None
    for ex in examples:
        logits = np.asarray(apply(params, jnp.asarray(ex["inputs"])[None]), np.float64)
        m = np_metrics(logits, np.asarray(ex["targets"])[None], np.asarray(ex["mask"])[None],
                       np.asarray(ex["group"]).reshape(1), groups)
        sums = m if sums is None else {k: sums[k] + m[k] for k in m}
    return sums


def numpy_metrics(logits, targets, mask) -> dict:
    """Mean cross-entropy and argmax accuracy over the masked steps, in float64 numpy."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    m = np.asarray(mask, bool)
    hits = np.argmax(np.asarray(logits), -1) == np.asarray(targets)
    return {"eval_loss": float(nll[m].sum() / m.sum()), "eval_accuracy": float(hits[m].sum() / m.sum()),
            "count": int(m.sum()), "all_steps_accuracy": float(hits.mean())}


def held_out_split(task: dict, data_dir: str):
    """(inputs, targets, mask) of a task's whole test split, in order."""
    from mnemax.train import tasks as tasks_lib

    src = tasks_lib.open_task(task["name"], task["params"], num_train=task["num_train"], num_test=task["num_test"],
                              seed=task["seed"], data_dir=data_dir).source("test")
    ex = [src[i] for i in range(len(src))]
    return tuple(np.stack([np.asarray(e[k]) for e in ex]) for k in ("inputs", "targets", "mask"))
