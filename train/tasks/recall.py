"""Recall after distractors: the pattern of HCAM's Ballet task (Lampinen et al., 2021).

Several dancers each perform a short dance (``dance_len`` steps: the dancer's id,
then ``dance_len - 1`` moves); a long delay of distractor tokens follows; finally a
query names one dancer and the model must answer which dance that dancer performed.

Each of the ``num_dance_types`` dances is a fixed move sequence drawn once from
``pattern_seed`` (shared by every example, so dances can be learned); in an example
each move is replaced by a random move with probability ``noise``.

Layout: ``[dancer move ... move] x num_dancers, distractors ..., QUERY, dancer``;
the target at the last position is the dance's answer token.
Vocabulary: 0 unused, 1 QUERY, dancer ids ``2 .. 2+max_dancers-1``, moves next
(``num_moves``), distractors next (``num_distractors``), answers last
(``num_dance_types``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Task, TaskBuilder, TaskSpec, check

QUERY, DANCER0 = 1, 2


@dataclasses.dataclass(frozen=True)
class RecallParams:
    seq_len: int = 128
    num_dancers: int = 4
    max_dancers: int = 8
    dance_len: int = 16
    num_dance_types: int = 8
    num_moves: int = 16
    num_distractors: int = 8
    noise: float = 0.1
    pattern_seed: int = 1234


class RecallAfterDistractors(Task):
    name = "recall"
    Params = RecallParams

    def validate(self) -> None:
        p = self.params
        check(1 <= p.num_dancers <= p.max_dancers, "num_dancers", f"must be in [1, max_dancers={p.max_dancers}], got {p.num_dancers}")
        check(p.dance_len >= 2, "dance_len", f"must be >= 2, got {p.dance_len}")
        check(p.num_dance_types >= 2, "num_dance_types", f"must be >= 2, got {p.num_dance_types}")
        check(0.0 <= p.noise < 0.5, "noise", f"must be in [0, 0.5), got {p.noise}")
        need = p.num_dancers * p.dance_len + 2
        check(p.seq_len >= need, "seq_len", f"{p.num_dancers} dances of {p.dance_len} steps need seq_len >= {need}, got {p.seq_len}")
        pats = self.patterns
        dist = (pats[:, None, :] != pats[None, :, :]).sum(-1) + np.eye(len(pats), dtype=int) * p.dance_len
        check(dist.min() > 0, "pattern_seed", "two dance types drew the same move sequence; pick another seed")

    @property
    def move0(self) -> int:
        return DANCER0 + self.params.max_dancers

    @property
    def distractor0(self) -> int:
        return self.move0 + self.params.num_moves

    @property
    def answer0(self) -> int:
        return self.distractor0 + self.params.num_distractors

    @property
    def patterns(self) -> np.ndarray:
        p = self.params
        rng = np.random.default_rng(p.pattern_seed)
        return rng.integers(0, p.num_moves, size=(p.num_dance_types, p.dance_len - 1))

    def spec(self) -> TaskSpec:
        v = self.answer0 + self.params.num_dance_types
        return TaskSpec(self.name, self.params.seq_len, num_outputs=v, head="lm", vocab_size=v)

    def generate(self, rng):
        p = self.params
        pats = self.patterns
        dancers = rng.choice(p.max_dancers, size=p.num_dancers, replace=False) + DANCER0
        types = rng.integers(0, p.num_dance_types, size=p.num_dancers)
        parts = []
        for d, k in zip(dancers, types):
            moves = pats[k].copy()
            flip = rng.random(moves.shape) < p.noise
            moves[flip] = rng.integers(0, p.num_moves, size=int(flip.sum()))
            parts.append(np.concatenate([[d], moves + self.move0]))
        delay = p.seq_len - p.num_dancers * p.dance_len - 2
        parts.append(rng.integers(self.distractor0, self.distractor0 + p.num_distractors, size=delay))
        asked = int(rng.integers(0, p.num_dancers))
        parts.append([QUERY, dancers[asked]])
        inputs = np.concatenate(parts).astype(np.int32)
        targets = np.zeros(p.seq_len, np.int32)
        targets[-1] = self.answer0 + types[asked]
        mask = np.zeros(p.seq_len, bool)
        mask[-1] = True
        return {"inputs": inputs, "targets": targets, "mask": mask}

    def oracle(self, example):
        p = self.params
        x = np.asarray(example["inputs"])
        dancer = x[-1]
        start = int(np.flatnonzero(x[: p.num_dancers * p.dance_len] == dancer)[0])
        moves = x[start + 1 : start + p.dance_len] - self.move0
        kind = int(np.argmin((self.patterns != moves[None]).sum(-1)))
        pred = np.zeros_like(x)
        pred[-1] = self.answer0 + kind
        return pred


class RecallTask(TaskBuilder):
    """TFDS builder of :class:`RecallAfterDistractors`."""

    TASK = RecallAfterDistractors
