"""ListOps (Nangia & Bowman, 2018; the LRA variant of Tay et al., 2021).

Nested prefix expressions over the digits 0-9 with the operators MAX, MIN, MED
(median; the lower middle element for an even count) and SM (sum modulo 10), e.g.
``[MAX 4 3 [MIN 2 3 ] 1 0 ]`` = 4. The expression is left-padded so that it ends at
the last position, which holds ``=``; the target there is the value (a digit token).

Vocabulary: 0 pad, digits 1..10 (value d is token d+1), 11 [MAX, 12 [MIN, 13 [MED,
14 [SM, 15 ], 16 =.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Task, TaskBuilder, TaskSpec, check

PAD, DIGIT0, OPEN0, CLOSE, EQUALS = 0, 1, 11, 15, 16
OPS = ("MAX", "MIN", "MED", "SM")
VOCAB = 17


def evaluate(op: str, args: list[int]) -> int:
    if op == "MAX":
        return max(args)
    if op == "MIN":
        return min(args)
    if op == "MED":
        return sorted(args)[(len(args) - 1) // 2]
    return sum(args) % 10


@dataclasses.dataclass(frozen=True)
class ListOpsParams:
    seq_len: int = 128
    max_depth: int = 4
    max_args: int = 5
    min_len: int = 8
    leaf_prob: float = 0.6


class ListOps(Task):
    name = "listops"
    Params = ListOpsParams

    def validate(self) -> None:
        p = self.params
        check(p.max_depth >= 1, "max_depth", f"must be >= 1, got {p.max_depth}")
        check(p.max_args >= 2, "max_args", f"must be >= 2, got {p.max_args}")
        check(0.0 <= p.leaf_prob < 1.0, "leaf_prob", f"must be in [0, 1), got {p.leaf_prob}")
        check(p.seq_len >= 5, "seq_len", f"the shortest expression ([OP d d ] =) needs seq_len >= 5, got {p.seq_len}")
        check(p.min_len <= p.seq_len - 1, "min_len", f"must be <= seq_len - 1 = {p.seq_len - 1}, got {p.min_len}")

    def spec(self) -> TaskSpec:
        return TaskSpec(self.name, self.params.seq_len, num_outputs=VOCAB, head="lm", vocab_size=VOCAB)

    def _tree(self, rng, depth):
        p = self.params
        if depth > 0 and (depth >= p.max_depth or rng.random() < p.leaf_prob):
            d = int(rng.integers(0, 10))
            return [DIGIT0 + d], d
        op = int(rng.integers(0, len(OPS)))
        n = int(rng.integers(2, p.max_args + 1))
        tokens, values = [OPEN0 + op], []
        for _ in range(n):
            t, v = self._tree(rng, depth + 1)
            tokens += t
            values.append(v)
        return tokens + [CLOSE], evaluate(OPS[op], values)

    def generate(self, rng):
        p = self.params
        while True:
            tokens, value = self._tree(rng, 0)
            if p.min_len <= len(tokens) <= p.seq_len - 1:
                break
        T = p.seq_len
        inputs = np.zeros(T, np.int32)
        inputs[T - 1 - len(tokens) : T - 1] = tokens
        inputs[T - 1] = EQUALS
        targets = np.zeros(T, np.int32)
        targets[T - 1] = DIGIT0 + value
        mask = np.zeros(T, bool)
        mask[T - 1] = True
        return {"inputs": inputs, "targets": targets, "mask": mask}

    def oracle(self, example):
        x = [int(t) for t in np.asarray(example["inputs"]) if t not in (PAD, EQUALS)]
        stack: list[list] = []
        result = None
        for t in x:
            if OPEN0 <= t < CLOSE:
                stack.append([OPS[t - OPEN0]])
            elif t == CLOSE:
                op, *args = stack.pop()
                v = evaluate(op, args)
                if stack:
                    stack[-1].append(v)
                else:
                    result = v
            else:
                stack[-1].append(t - DIGIT0)
        pred = np.zeros(len(example["inputs"]), np.int32)
        pred[-1] = DIGIT0 + result
        return pred


class ListopsTask(TaskBuilder):
    """TFDS builder of :class:`ListOps`."""

    TASK = ListOps
