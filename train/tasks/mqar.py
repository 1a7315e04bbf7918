"""MQAR: multi-query associative recall (Arora et al., 2023, "Zoology").

A sequence starts with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...``; later,
``num_queries`` of the keys appear again, each followed by its value. At each query
key the model must predict the value bound to it earlier. Positions that hold no
pair or query are filler (token 0, or random tokens with ``filler='random'``).

Vocabulary: 0 = filler; keys ``1 .. num_keys``; values ``num_keys+1 .. vocab_size-1``
with ``num_keys = (vocab_size - 1) // 2``. Keys in one sequence are distinct; values
are drawn with replacement. Query slots are placed uniformly at random after the
pairs (each takes two positions: key then value).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Task, TaskBuilder, TaskSpec, check


@dataclasses.dataclass(frozen=True)
class MQARParams:
    seq_len: int = 64
    num_pairs: int = 8
    num_queries: int | None = None  # None: every key is queried once
    vocab_size: int = 64
    filler: str = "zeros"  # "zeros" | "random"


class MQAR(Task):
    name = "mqar"
    Params = MQARParams

    @property
    def num_keys(self) -> int:
        return (self.params.vocab_size - 1) // 2

    @property
    def queries(self) -> int:
        p = self.params
        return p.num_pairs if p.num_queries is None else p.num_queries

    def validate(self) -> None:
        p = self.params
        check(p.vocab_size >= 5, "vocab_size", f"must be >= 5, got {p.vocab_size}")
        check(p.num_pairs >= 1, "num_pairs", f"must be >= 1, got {p.num_pairs}")
        check(p.num_pairs <= self.num_keys, "num_pairs", f"{p.num_pairs} pairs need {p.num_pairs} distinct keys, but vocab_size={p.vocab_size} gives {self.num_keys}")
        check(1 <= self.queries <= p.num_pairs, "num_queries", f"must be in [1, num_pairs={p.num_pairs}], got {self.queries}")
        need = 2 * p.num_pairs + 2 * self.queries
        check(p.seq_len >= need, "seq_len", f"{p.num_pairs} pairs and {self.queries} queries need seq_len >= {need}, got {p.seq_len}")
        check(p.filler in ("zeros", "random"), "filler", f"must be 'zeros' or 'random', got {p.filler!r}")

    def spec(self) -> TaskSpec:
        p = self.params
        return TaskSpec(self.name, p.seq_len, num_outputs=p.vocab_size, head="lm", vocab_size=p.vocab_size)

    def generate(self, rng):
        p = self.params
        n, q, T = p.num_pairs, self.queries, p.seq_len
        keys = rng.choice(np.arange(1, self.num_keys + 1), size=n, replace=False)
        values = rng.integers(self.num_keys + 1, p.vocab_size, size=n)
        if p.filler == "zeros":
            inputs = np.zeros(T, np.int32)
        else:
            inputs = rng.integers(0, p.vocab_size, size=T).astype(np.int32)
        inputs[0 : 2 * n : 2] = keys
        inputs[1 : 2 * n : 2] = values
        slots = (T - 2 * n) // 2
        chosen = np.sort(rng.choice(slots, size=q, replace=False))
        which = rng.choice(n, size=q, replace=False)
        targets = np.zeros(T, np.int32)
        mask = np.zeros(T, bool)
        for slot, j in zip(chosen, which):
            pos = 2 * n + 2 * slot
            inputs[pos], inputs[pos + 1] = keys[j], values[j]
            targets[pos], mask[pos] = values[j], True
        return {"inputs": inputs, "targets": targets, "mask": mask}

    def oracle(self, example):
        n = self.params.num_pairs
        x = np.asarray(example["inputs"])
        table = dict(zip(x[0 : 2 * n : 2].tolist(), x[1 : 2 * n : 2].tolist()))
        pred = np.zeros_like(x)
        for t in np.flatnonzero(example["mask"]):
            pred[t] = table[int(x[t])]
        return pred


class Mqar(TaskBuilder):
    """TFDS builder of :class:`MQAR`."""

    TASK = MQAR
