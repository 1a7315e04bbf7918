"""Evaluate a release bundle on the held-out split of the task it was trained on.

    python -m mnemax.train.evaluate --release=runs/mqar/release [--data_dir=...]

Prints the held-out loss and accuracy (and per-group accuracy, e.g. by needle depth),
computed exactly as the trainer computes them. The task is read from the bundle's
``config.json`` (``extra.task``); its dataset is regenerated locally if missing.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags

import mnemax
from mnemax.sharding import make_mesh

from . import tasks as tasks_lib
from .data import Feeder
from .trainer import accumulate_eval, default_data_dir, masked_metrics


def evaluate_release(path: str, *, data_dir: str | None = None, batch_size: int = 256, mesh=None) -> dict:
    """Loads the bundle at ``path`` and evaluates it on its task's test split."""
    with open(os.path.join(path, "config.json")) as f:
        extra = json.load(f).get("extra", {})
    task = extra.get("task")
    if not task:
        raise ValueError(f"release {path!r} records no training task (config.json extra.task); evaluate it yourself")
    mesh = mesh or make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model, params = mnemax.load_pretrained(path, mesh=mesh)
    src = tasks_lib.open_task(
        task["name"], task.get("params", {}), num_train=task["num_train"], num_test=task["num_test"], seed=task["seed"],
        data_dir=data_dir or task.get("data_dir") or default_data_dir(),
    )
    spec = src.spec()
    groups = len(spec.group_names)
    feeder = Feeder(src, mesh, batch_size=batch_size, seed=0)

    @jax.jit
    def step(params, batch):
        logits, _ = model.apply(params, batch["inputs"])
        return masked_metrics(logits, batch["targets"], batch["mask"], batch["group"], groups)

    return accumulate_eval(lambda batch: step(params, batch), feeder.eval_batches(batch_size), spec.group_names)


FLAGS = flags.FLAGS
flags.DEFINE_string("release", None, "Path of a release bundle written by the trainer.")
flags.DEFINE_string("data_dir", None, "Where the task's dataset lives (default: the one recorded at training).")


def main(argv):
    del argv
    if FLAGS.release is None:
        raise app.UsageError("--release is required")
    result = evaluate_release(FLAGS.release, data_dir=FLAGS.data_dir)
    for k, v in sorted(result.items()):
        print(f"{k}: {v:.4f}")


if __name__ == "__main__":
    app.run(main)
