"""Passkey retrieval (Mohtashami & Jaggi, 2023).

A key of ``key_len`` digits is hidden at a chosen depth of a long stretch of filler;
at the end, after a query marker, the model must reproduce the key (teacher-forced:
at the marker the target is the first digit, at digit i the target is digit i+1).

Layout: ``filler .. [KEY] d_1 .. d_K [END] .. filler .. [QUERY] d_1 .. d_{K-1}``.
``depth`` in [0, 1] places the needle's start at that fraction of the filler span
(``"uniform"``: a random depth per example); ``group`` is the depth bucket
(``depth_buckets`` equal bins), so evaluation reports accuracy by depth.

Vocabulary: 0 unused, 1 KEY, 2 END, 3 QUERY, digits 4..13, filler tokens
``14 .. 14 + filler_vocab - 1`` (disjoint from the digits).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Task, TaskBuilder, TaskSpec, check

KEY, END, QUERY, DIGIT0, FILLER0 = 1, 2, 3, 4, 14


@dataclasses.dataclass(frozen=True)
class PasskeyParams:
    seq_len: int = 128
    key_len: int = 5
    depth: float | str = "uniform"
    depth_buckets: int = 5
    filler_vocab: int = 16


class Passkey(Task):
    name = "passkey"
    Params = PasskeyParams

    def validate(self) -> None:
        p = self.params
        check(p.key_len >= 1, "key_len", f"must be >= 1, got {p.key_len}")
        check(p.filler_vocab >= 1, "filler_vocab", f"must be >= 1, got {p.filler_vocab}")
        check(p.depth_buckets >= 1, "depth_buckets", f"must be >= 1, got {p.depth_buckets}")
        if p.depth != "uniform":
            check(isinstance(p.depth, int | float) and 0.0 <= float(p.depth) <= 1.0, "depth", f"must be 'uniform' or in [0, 1], got {p.depth!r}")
        need = 2 * p.key_len + 3
        check(p.seq_len >= need, "seq_len", f"a key of {p.key_len} digits needs seq_len >= {need}, got {p.seq_len}")

    @property
    def filler_span(self) -> int:
        p = self.params
        return p.seq_len - (p.key_len + 2) - p.key_len  # filler positions available before the query

    def spec(self) -> TaskSpec:
        p = self.params
        v = FILLER0 + p.filler_vocab
        b = p.depth_buckets
        names = tuple(f"depth {i / b:.0%}-{(i + 1) / b:.0%}" for i in range(b))
        return TaskSpec(self.name, p.seq_len, num_outputs=v, head="lm", vocab_size=v, group_names=names)

    def generate(self, rng):
        p = self.params
        k, T = p.key_len, p.seq_len
        depth = rng.random() if p.depth == "uniform" else float(p.depth)
        span = self.filler_span
        start = int(round(depth * span))  # filler tokens before the needle
        digits = rng.integers(0, 10, size=k) + DIGIT0
        filler = rng.integers(FILLER0, FILLER0 + p.filler_vocab, size=span)
        needle = np.concatenate([[KEY], digits, [END]])
        query = np.concatenate([[QUERY], digits[:-1]])
        inputs = np.concatenate([filler[:start], needle, filler[start:], query]).astype(np.int32)
        targets = np.zeros(T, np.int32)
        targets[T - k :] = digits
        mask = np.zeros(T, bool)
        mask[T - k :] = True
        group = min(int(depth * p.depth_buckets), p.depth_buckets - 1)
        return {"inputs": inputs, "targets": targets, "mask": mask, "group": np.int32(group)}

    def oracle(self, example):
        x = np.asarray(example["inputs"])
        k = self.params.key_len
        at = int(np.flatnonzero(x == KEY)[0])
        pred = np.zeros_like(x)
        pred[len(x) - k :] = x[at + 1 : at + 1 + k]
        return pred


class PasskeyTask(TaskBuilder):
    """TFDS builder of :class:`Passkey`."""

    TASK = Passkey
