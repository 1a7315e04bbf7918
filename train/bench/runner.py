"""Training the benchmark's cells: one cell (:func:`run_cell`, through ``Trainer.fit``), a
list of jobs in this process (:func:`run_serial`) or as concurrent processes
(:func:`run_parallel`). A cell that fails becomes an error row (in the JSON, not the
table); the run goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from mnemax.configs.base import base_config

from .. import tasks as tasks_lib
from ..evaluate import evaluate_model
from ..trainer import Trainer
from .plan import DEFAULT_LR, Cell, Job, family_overrides, run_name, sized_overrides

SMOKE = {"num_train": 64, "num_test": 32, "steps": 3, "batch": 8}  # --smoke: a few steps per cell
EVAL_BATCH = 32


def cell_config(preset: str, overrides: dict, spec: tasks_lib.TaskSpec, cell: Cell, budget: dict, data_dir: str,
                smoke: bool, seed: int = 0):
    """The trainer config of one cell: ``preset`` with ``overrides`` (those the task sets are
    left to the task) on the cell's task, the budget's steps / batch / rate (``budget["lr"]``,
    else :data:`DEFAULT_LR`), or the :data:`SMOKE` sizes; no periodic evaluation or
    checkpoint, no release, one device."""
    c = base_config()
    c.seed = seed
    c.model.preset = preset
    c.model.overrides = {k: v for k, v in overrides.items() if k not in spec.model_overrides()}
    c.task.name = cell.task
    c.task.params = cell.params
    c.task.num_train = SMOKE["num_train"] if smoke else 20000
    c.task.num_test = SMOKE["num_test"] if smoke else 1000
    c.task.seed = seed
    c.task.data_dir = data_dir
    c.train.steps = SMOKE["steps"] if smoke else budget["steps"]
    c.train.batch_size = SMOKE["batch"] if smoke else budget["batch"]
    c.train.warmup_steps = 1 if smoke else min(100, budget["steps"] // 10)
    c.train.learning_rate = budget.get("lr", DEFAULT_LR)
    c.eval.every_steps = 0
    c.eval.batch_size = EVAL_BATCH
    c.checkpoint.every_steps = 0
    c.log.progress_bar = False
    c.log.console = False
    c.log.tensorboard = False
    c.release.write = False
    c.mesh.num_devices = 1
    return c


def run_cell(family: str, preset: str, fixed: dict, cell: Cell, budget: dict, workdir: str, data_dir: str,
             smoke: bool, seed: int = 0) -> dict:
    """Trains ``family`` (``preset`` with ``fixed`` overrides, sized to ``budget``) on ``cell``
    in ``workdir``; returns its row: held-out accuracy and loss, per-group accuracy
    (``acc <group>``) and, for a cell with ``eval_lengths``, the accuracy at each length
    (``acc len=<n>``) of the trained parameters."""
    spec = tasks_lib.make_task(cell.task, **cell.params).spec()
    span = max(cell.eval_lengths) if cell.eval_lengths else None
    overrides, n_params = sized_overrides(preset, fixed, spec, budget["params"], budget["layers"], span=span)
    c = cell_config(preset, overrides, spec, cell, budget, data_dir, smoke, seed)
    t0 = time.time()
    trainer = Trainer(c, workdir)
    fitted = trainer.fit()
    result = fitted.metrics
    row = {
        "family": family, "preset": preset, "task": cell.task, "difficulty": cell.difficulty,
        "params": n_params, "d_model": overrides["d_model"], "steps": c.train.steps, "lr": c.train.learning_rate,
        "accuracy": result["eval_accuracy"], "loss": result["eval_loss"], "seconds": time.time() - t0, "seed": seed,
    }
    for k, v in result.items():
        if k.startswith("eval_accuracy/"):
            row[k.replace("eval_accuracy/", "acc ")] = v
    for length in cell.eval_lengths:
        out = evaluate_model(trainer.model, {"params": fitted.state.params}, cell.task, {**cell.params, "seq_len": length},
                             num_test=c.task.num_test, seed=seed, data_dir=data_dir, mesh=trainer.mesh,
                             batch_size=c.eval.batch_size, time_chunk=None)
        row[f"acc len={length}"] = out["eval_accuracy"]
    return row


def error_row(family: str, preset: str, cell: Cell, seed: int, error: str) -> dict:
    """The row of a cell that failed: reported in the JSON, left out of the table."""
    return {"family": family, "preset": preset, "task": cell.task, "difficulty": cell.difficulty, "params": 0,
            "accuracy": float("nan"), "seed": seed, "error": error}


def print_row(row: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def run_serial(todo: list[Job], fams: dict, budget_name: str, budget: dict, work: str, data_dir: str, *,
               smoke: bool, learning_rate: float | None = None) -> list[dict]:
    """Each job of ``todo`` in this process, in order (``fams``: label -> (preset, fixed)),
    each in its own directory under ``work`` (:func:`~.plan.run_name`); their rows."""
    rows = []
    for job in todo:
        preset, fixed = fams[job.family]
        wd = os.path.join(work, run_name(budget_name, budget["steps"], job, learning_rate=learning_rate, smoke=smoke))
        try:
            row = run_cell(job.family, preset, family_overrides(job.family, fixed, budget_name), job.cell, budget, wd,
                           data_dir, smoke, seed=job.seed)
        except Exception as err:  # noqa: BLE001 - a family that cannot take a task is reported, not fatal
            row = error_row(job.family, preset, job.cell, job.seed, f"{type(err).__name__}: {str(err)[:200]}")
        rows.append(row)
        print_row(row)
    return rows


def run_parallel(todo: list[Job], fams: dict, processes: int, common_argv: list[str], work: str,
                 data_dir: str | None = None) -> list[dict]:
    """Each job of ``todo`` as its own ``python -m mnemax.train.bench memory`` process (with
    ``common_argv``: the budget, steps, rate, passkey and smoke flags of this run),
    ``processes`` at a time, in order; their rows in that order. Each process has its own
    data directory under ``data_dir`` (default ``<work>/data``; two processes building one
    TFDS dataset would race), logs to ``<work>/logs/<job>.log`` and, on the GPU, allocates
    memory as it needs it rather than preallocating most of the device."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    rows: list = [None] * len(todo)
    running: dict = {}
    pending = list(range(len(todo)))
    while pending or running:
        while pending and len(running) < processes:
            i = pending.pop(0)
            job = todo[i]
            name = f"{i:03d}-{job.family}-{job.cell.task}-{job.cell.difficulty}-seed{job.seed}".replace("=", "").replace("+", "_")
            cmd = [sys.executable, "-m", "mnemax.train.bench", "memory", *common_argv, "--workdir", work,
                   "--families", job.family, "--tasks", job.cell.task, "--difficulties", job.cell.difficulty,
                   "--seeds", str(job.seed), "--out", os.path.join(work, "cells", name),
                   "--data_dir", os.path.join(data_dir or os.path.join(work, "data"), name)]
            log = open(os.path.join(work, "logs", f"{name}.log"), "w")
            running[i] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, name)
        for i, (proc, log, name) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[i]
            job = todo[i]
            out_dir = os.path.join(work, "cells", name)
            found = [f for f in sorted(os.listdir(out_dir)) if f.endswith(".json")] if os.path.isdir(out_dir) else []
            if proc.returncode == 0 and found:
                with open(os.path.join(out_dir, found[0])) as f:
                    rows[i] = json.load(f)["rows"][0]
            else:
                with open(os.path.join(work, "logs", f"{name}.log")) as f:
                    tail = f.read()[-300:]
                rows[i] = error_row(job.family, fams[job.family][0], job.cell, job.seed,
                                    f"process exited with {proc.returncode}: {tail}")
            print_row(rows[i])
        if running:
            time.sleep(0.5)
    return rows
