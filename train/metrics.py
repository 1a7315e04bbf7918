"""Run feedback: a progress bar, console lines, ``metrics.jsonl`` and TensorBoard events.

Only process 0 writes. Every record is one JSON object per line in
``<workdir>/metrics.jsonl`` (``{"step": ..., "loss": ..., ...}``; eval records carry
``eval_`` keys) and a scalar per key in ``<workdir>/tensorboard``. A run that starts at
step ``start_step`` (0, or the step of the checkpoint it resumed from) first cuts
``metrics.jsonl`` back to the records of steps <= ``start_step``, so the steps it
recomputes are not recorded twice (TensorBoard keeps both: its event files are
append-only).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import logging


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, progress_bar: bool = True,
                 total_steps: int = 0, start_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_after(self.path, start_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5)

    def write(self, step: int, values: dict, *, console: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, int | float) or hasattr(v, "item") else v) for k, v in values.items()}
        record = {"step": int(step), "time": time.time(), **clean}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if console:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(clean.items()))
            msg = f"step {step}: {text}"
            logging.info(msg)
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.update(0)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def truncate_after(path: str, step: int) -> None:
    """Drops the records of steps > ``step`` from a metrics.jsonl (and a torn last line), atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(json.dumps(record, sort_keys=True) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``<workdir>/metrics.jsonl`` in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
