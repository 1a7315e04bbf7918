"""Causal depthwise 1-D convolution that streams.

``y_t = bias + sum_{j=0}^{W-1} w[j] * x_{t - (W-1) + j}`` per channel (the layout of
PyTorch's ``Conv1d(groups=channels, padding=W-1)`` truncated to the first T outputs,
as Mamba and xLSTM use it). Inputs before the sequence come from the state: the last
``W - 1`` inputs of the previous call (zeros for a fresh memory). With ``resets``,
taps that reach across an episode boundary see zeros.

Shapes::

    y, state = CausalConv1d(features=C, width=W)(x, state, resets)
    x, y: (batch, time, C);  state: ConvState(inputs=(batch, W - 1, C)) float32

``x`` may also be a tuple of parts (batch, time, C_i) with sum C_i = C, the channels of one
array split in order: each part is convolved with its columns of the kernel, bias and
state, and ``y`` is the tuple of the parts' outputs (the same values as splitting the
output of the joined input). A layer that splits a projection's output before and after
the conv (Mamba-2's x, B, C) then never joins the channels, nor their gradients, in memory.
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
        parts = tuple(x) if isinstance(x, (tuple, list)) else None
        if parts is None:
            check_sequence(x, self.features)
        else:
            for i, part in enumerate(parts):
                check_sequence(part, name=f"x[{i}]")
            widths = [part.shape[-1] for part in parts]
            if sum(widths) != self.features or len({part.shape[:2] for part in parts}) != 1:
                raise ValueError(
                    f"x: parts must share (batch, time) and have {self.features} channels in all, got shapes "
                    f"{[tuple(part.shape) for part in parts]}"
                )
        batch, time = (parts[0] if parts else x).shape[:2]
        resets = check_resets(resets, batch, time)
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if state is None:
            state = self.initial_state(batch)
        else:
            check_state(state, expected_state(self, batch))
        dt = compute_dtype(self.dtype, parts[0] if parts else x)
        kernel = self.param(
            "kernel",
            partitioned(torch_conv_init(self.width), ("conv", self.axis_name)),
            (self.width, self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", partitioned(torch_conv_init(self.width), (self.axis_name,)), (self.features,), self.param_dtype
            )
        w1 = self.width - 1
        seg = segment_ids(resets, batch, time)
        seg_ext = jnp.concatenate([jnp.zeros((batch, w1), jnp.int32), seg], axis=1)
        outs, tails, start = [], [], 0
        for part in parts or (x,):
            cols = slice(start, start + part.shape[-1])
            start = cols.stop
            x_p, s_p = part.astype(dt), state.inputs[..., cols].astype(dt)
            y = jnp.zeros(part.shape, dt)
            for j in range(self.width):
                # tap j reads x_{t - (W-1) + j}: its own join of the state and x, which XLA fuses into
                # this sum (one joined array read by every tap would be written to memory)
                src = jnp.concatenate([s_p[:, j:], x_p], axis=1)[:, :time]
                if resets is not None:
                    same = (seg_ext[:, j : j + time] == seg)[..., None]
                    src = jnp.where(same, src, jnp.zeros_like(src))
                y = y + src * kernel[j, cols].astype(dt)
            if bias is not None:
                y = y + bias[cols].astype(dt)
            outs.append(y)
            tails.append(jnp.concatenate([s_p, x_p], axis=1)[:, time:])
        tail = tails[0] if len(tails) == 1 else jnp.concatenate(tails, axis=-1)
        if resets is not None:
            # Inputs before the last reset must not leak into the next call.
            keep = (seg_ext[:, time:] == seg[:, -1:])[..., None]
            tail = jnp.where(keep, tail, jnp.zeros_like(tail))
        new_state = ConvState(tail.astype(state.inputs.dtype))
        return (tuple(outs) if parts else outs[0]), new_state
