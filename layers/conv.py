"""Causal depthwise 1-D convolution that streams.

``y_t = bias + sum_{j=0}^{W-1} w[j] * x_{t - (W-1) + j}`` per channel (the layout of
PyTorch's ``Conv1d(groups=channels, padding=W-1)`` truncated to the first T outputs,
as Mamba and xLSTM use it). Inputs before the sequence come from the state: the last
``W - 1`` inputs of the previous call (zeros for a fresh memory). With ``resets``,
taps that reach across an episode boundary see zeros.

Shapes::

    y, state = CausalConv1d(features=C, width=W)(x, state, resets)
    x, y: (batch, time, C);  state: ConvState(inputs=(batch, W - 1, C)) float32
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .base import (
    Dtype,
    check_resets,
    check_sequence,
    check_state,
    compute_dtype,
    expected_state,
    partitioned,
    segment_ids,
    state_dtype,
)


class ConvState(NamedTuple):
    inputs: jax.Array  # (batch, width - 1, features): the last width - 1 inputs


def torch_conv_init(width: int):
    """PyTorch's default Conv1d init for a depthwise conv: U(-1/sqrt(W), 1/sqrt(W))."""
    bound = 1.0 / jnp.sqrt(width)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time with a streaming state (see module docstring)."""

    features: int
    width: int = 4
    use_bias: bool = True
    axis_name: str | None = "embed"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def initial_state(self, batch_size: int) -> ConvState:
        return ConvState(
            jnp.zeros((batch_size, self.width - 1, self.features), state_dtype(self.dtype))
        )

    @nn.compact
    def __call__(self, x, state: ConvState | None = None, resets=None):
        check_sequence(x, self.features)
        batch, time, _ = x.shape
        resets = check_resets(resets, batch, time)
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if state is None:
            state = self.initial_state(batch)
        else:
            check_state(state, expected_state(self, batch))
        dt = compute_dtype(self.dtype, x)
        kernel = self.param(
            "kernel",
            partitioned(torch_conv_init(self.width), ("conv", self.axis_name)),
            (self.width, self.features),
            self.param_dtype,
        )
        w1 = self.width - 1
        x_ext = jnp.concatenate([state.inputs.astype(dt), x.astype(dt)], axis=1)
        seg = segment_ids(resets, batch, time)
        seg_ext = jnp.concatenate([jnp.zeros((batch, w1), jnp.int32), seg], axis=1)
        kernel = kernel.astype(dt)
        y = jnp.zeros((batch, time, self.features), dt)
        for j in range(self.width):
            src = x_ext[:, j : j + time]
            if resets is not None:
                same = (seg_ext[:, j : j + time] == seg)[..., None]
                src = jnp.where(same, src, jnp.zeros_like(src))
            y = y + src * kernel[j]
        if self.use_bias:
            bias = self.param(
                "bias", partitioned(torch_conv_init(self.width), (self.axis_name,)), (self.features,), self.param_dtype
            )
            y = y + bias.astype(dt)
        tail = x_ext[:, time:]
        if resets is not None:
            # Inputs before the last reset must not leak into the next call.
            keep = (seg_ext[:, time:] == seg[:, -1:])[..., None]
            tail = jnp.where(keep, tail, jnp.zeros_like(tail))
        new_state = ConvState(tail.astype(state.inputs.dtype))
        return y, new_state
