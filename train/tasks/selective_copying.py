"""Selective copying (Gu & Dao, 2023, "Mamba", section 3.1).

``num_tokens`` data tokens are scattered at random positions of a region of blanks;
after a separator the model must reproduce them in order. The answer section is
teacher-forced (next-token format): at the separator the target is the first data
token, at the i-th copied token the target is the (i+1)-th.

Layout (``R = seq_len - num_tokens``): ``[region of R] [SEP] [d_0 .. d_{M-2}]``.
Vocabulary: 0 = blank, 1 = SEP, data tokens ``2 .. 2 + data_vocab - 1``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Task, TaskBuilder, TaskSpec, check


@dataclasses.dataclass(frozen=True)
class SelectiveCopyingParams:
    seq_len: int = 64
    num_tokens: int = 8
    data_vocab: int = 8


class SelectiveCopying(Task):
    name = "selective_copying"
    Params = SelectiveCopyingParams

    def validate(self) -> None:
        p = self.params
        check(p.num_tokens >= 1, "num_tokens", f"must be >= 1, got {p.num_tokens}")
        check(p.data_vocab >= 2, "data_vocab", f"must be >= 2, got {p.data_vocab}")
        check(p.seq_len >= 2 * p.num_tokens, "seq_len", f"{p.num_tokens} tokens need seq_len >= {2 * p.num_tokens}, got {p.seq_len}")

    def spec(self) -> TaskSpec:
        p = self.params
        v = p.data_vocab + 2
        return TaskSpec(self.name, p.seq_len, num_outputs=v, head="lm", vocab_size=v)

    def generate(self, rng):
        p = self.params
        m, T = p.num_tokens, p.seq_len
        region = T - m
        data = rng.integers(2, 2 + p.data_vocab, size=m).astype(np.int32)
        where = np.sort(rng.choice(region, size=m, replace=False))
        inputs = np.zeros(T, np.int32)
        inputs[where] = data
        inputs[region] = 1
        inputs[region + 1 :] = data[:-1]
        targets = np.zeros(T, np.int32)
        targets[region:] = data
        mask = np.zeros(T, bool)
        mask[region:] = True
        return {"inputs": inputs, "targets": targets, "mask": mask}

    def oracle(self, example):
        x = np.asarray(example["inputs"])
        region = self.params.seq_len - self.params.num_tokens
        data = x[:region][x[:region] > 1]
        pred = np.zeros_like(x)
        pred[region:] = data
        return pred


class SelectiveCopyingTask(TaskBuilder):
    """TFDS builder of :class:`SelectiveCopying`."""

    TASK = SelectiveCopying
