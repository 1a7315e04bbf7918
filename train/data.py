"""Feeding a task's examples to a sharded train step.

Training order: ``grain.MapDataset.source(train).shuffle(seed).repeat()``, a seeded
permutation per epoch with random access, so row ``r`` of step ``s`` is example
``s * global_batch + r`` of that stream no matter which process reads it or when:
a resumed run sees exactly the batches an uninterrupted run sees. Each process reads
only the rows its devices hold (``sharding.process_rows``) and the global batch is
assembled with ``jax.make_array_from_process_local_data``.

Evaluation reads the test split in order, each example once, in batches of
``eval.batch_size`` rows (the last one padded with masked-out rows).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grain
import jax
import numpy as np

from mnemax.sharding import batch_sharding, process_rows

FIELDS = ("inputs", "targets", "mask", "group")


def check_ids(batch: dict[str, np.ndarray], spec, where: str) -> None:
    """Token inputs in [0, vocab_size) and targets in [0, num_outputs): an id past the
    table gives NaN logits or a silently clamped target, so a bad dataset stops here."""
    from mnemax.layers.base import check_token_ids

    if spec.vocab_size is not None:
        check_token_ids(batch["inputs"], spec.vocab_size, name=f"{where} inputs")
    check_token_ids(batch["targets"], spec.num_outputs, name=f"{where} targets")


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in FIELDS:
        arr = np.stack([np.asarray(e[k]) for e in examples])
        if k == "inputs" and arr.dtype == np.uint8:
            arr = arr.astype(np.float32)
        if k in ("targets", "group"):
            arr = arr.astype(np.int32)
        out[k] = arr
    return out


class Feeder:
    """Global batches for a mesh, reading this process's rows only."""

    def __init__(self, task_source, mesh, *, batch_size: int, seed: int):
        self.mesh = mesh
        self.batch_size = batch_size
        self.train = grain.MapDataset.source(task_source.source("train")).shuffle(seed=seed).repeat()
        self.test = task_source.source("test")
        spec = task_source.spec()
        self.spec = spec
        self.input_ndim = 2 if spec.input_dim is None else 3

    def _global(self, local: dict[str, np.ndarray], rows_total: int) -> dict[str, jax.Array]:
        out = {}
        for k, v in local.items():
            sharding = batch_sharding(self.mesh, v.ndim)
            out[k] = jax.make_array_from_process_local_data(sharding, v, (rows_total,) + v.shape[1:])
        return out

    def rows(self, batch_size: int) -> np.ndarray:
        return process_rows(batch_sharding(self.mesh, 2), (batch_size, 1))

    def train_batch_local(self, step: int) -> dict[str, np.ndarray]:
        base = step * self.batch_size
        batch = _stack([self.train[int(base + r)] for r in self.rows(self.batch_size)])
        check_ids(batch, self.spec, f"the training batch of step {step}:")
        return batch

    def train_batches(self, start_step: int, prefetch: int = 2) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        """(step, global batch) from ``start_step`` on; a thread reads ahead."""
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def work():
            step = start_step
            try:
                while not stop.is_set():
                    q.put((step, self.train_batch_local(step)))
                    step += 1
            except BaseException as err:  # noqa: BLE001 - surfaced in the consumer
                q.put(err)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                step, local = item
                yield step, self._global(local, self.batch_size)
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def eval_batches(self, batch_size: int, num_examples: int | None = None) -> Iterator[dict[str, jax.Array]]:
        """The first ``num_examples`` test examples (all when None), each exactly once:
        the last batch is padded with copies whose mask is zero."""
        n = len(self.test) if num_examples is None else min(num_examples, len(self.test))
        rows = self.rows(batch_size)
        for start in range(0, n, batch_size):
            examples = []
            for r in rows:
                i = start + int(r)
                ex = dict(self.test[i % n])
                if i >= n:
                    ex["mask"] = np.zeros_like(np.asarray(ex["mask"]))
                examples.append(ex)
            batch = _stack(examples)
            check_ids(batch, self.spec, f"the test examples {start}..{min(start + batch_size, n) - 1}:")
            yield self._global(batch, batch_size)
