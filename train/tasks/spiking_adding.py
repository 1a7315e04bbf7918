"""Spiking adding: a synthetic stand-in for ELM's SHD-Adding (Spieler et al., 2023).

Two "spoken digits" are presented one after the other as spike trains over
``num_channels`` input channels; the label is their sum (0..18), to be given at the
last step. Each digit is a rate template: every channel fires at a high rate
(``rate_high``) during a window of ``burst`` bins whose onset depends on the digit and
the channel, and at ``rate_low`` otherwise; spikes are Bernoulli draws per bin. All
digits give every channel the same expected spike count, so only the timing of the
spikes tells digits apart: a bag of spike counts cannot solve the task, a model
with memory of temporal patterns can.

Inputs: ``(seq_len, num_channels)`` 0/1 features, ``seq_len = 2 * bins_per_digit +
gap``; target at the last step: the sum (19 classes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .base import Task, TaskBuilder, TaskSpec, check


@dataclasses.dataclass(frozen=True)
class SpikingAddingParams:
    num_channels: int = 32
    bins_per_digit: int = 40
    gap: int = 0
    burst: int = 4
    rate_high: float = 0.7
    rate_low: float = 0.02
    template_seed: int = 4321


class SpikingAdding(Task):
    name = "spiking_adding"
    Params = SpikingAddingParams
    input_dtype = np.uint8

    def validate(self) -> None:
        p = self.params
        check(p.num_channels >= 1, "num_channels", f"must be >= 1, got {p.num_channels}")
        check(1 <= p.burst < p.bins_per_digit, "burst", f"must be in [1, bins_per_digit={p.bins_per_digit}), got {p.burst}")
        check(p.gap >= 0, "gap", f"must be >= 0, got {p.gap}")
        check(0.0 <= p.rate_low < p.rate_high <= 1.0, "rate_high", f"need 0 <= rate_low < rate_high <= 1, got {p.rate_low}, {p.rate_high}")

    @property
    def seq_len(self) -> int:
        return 2 * self.params.bins_per_digit + self.params.gap

    @property
    def templates(self) -> np.ndarray:
        """(10, bins_per_digit, num_channels) spike probabilities."""
        p = self.params
        rng = np.random.default_rng(p.template_seed)
        onsets = rng.integers(0, p.bins_per_digit - p.burst + 1, size=(10, p.num_channels))
        t = np.arange(p.bins_per_digit)[None, :, None]
        on = (t >= onsets[:, None, :]) & (t < onsets[:, None, :] + p.burst)
        return np.where(on, p.rate_high, p.rate_low)

    def spec(self) -> TaskSpec:
        return TaskSpec(self.name, self.seq_len, num_outputs=19, head="classify", input_dim=self.params.num_channels)

    def generate(self, rng):
        p = self.params
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        tmpl = self.templates
        first = rng.random(tmpl[a].shape) < tmpl[a]
        second = rng.random(tmpl[b].shape) < tmpl[b]
        gap = rng.random((p.gap, p.num_channels)) < p.rate_low
        inputs = np.concatenate([first, gap, second]).astype(np.uint8)
        T = self.seq_len
        targets = np.zeros(T, np.int32)
        targets[-1] = a + b
        mask = np.zeros(T, bool)
        mask[-1] = True
        return {"inputs": inputs, "targets": targets, "mask": mask}

    def _classify(self, spikes):
        tmpl = self.templates
        ll = (spikes[None] * np.log(tmpl) + (1 - spikes[None]) * np.log1p(-tmpl)).sum((1, 2))
        return int(np.argmax(ll))

    def oracle(self, example):
        p = self.params
        x = np.asarray(example["inputs"], np.float64)
        a = self._classify(x[: p.bins_per_digit])
        b = self._classify(x[p.bins_per_digit + p.gap :])
        pred = np.zeros(self.seq_len, np.int32)
        pred[-1] = a + b
        return pred


class SpikingAddingTask(TaskBuilder):
    """TFDS builder of :class:`SpikingAdding`."""

    TASK = SpikingAdding
