"""The ``pallas_gpu`` backend of ``selective_scan`` (Mosaic GPU on Hopper): which kernel
layout runs, and the packed problem they share (equations and shapes: :mod:`.common`).

Both passes are fused: softplus(dt + dt_bias), ``exp(dt A)``, ``dt B x``, ``C . h``, the
``D`` skip and the ``silu(z)`` gate all happen on chip, and the state lives in float32
registers across the whole sequence; nothing of shape (batch, time, channels, state) is
written to HBM. The forward saves the state at every chunk start; the backward walks the
chunks from last to first and recomputes each chunk from its boundary.

Layouts (``SelectiveScanConfig``):

* a forward with no backward after it (inference, prefill, evaluation): the lanes
  forward (:mod:`.gpu_lanes`, each channel's states over the 4 lanes of a quad, 32
  channels per CTA) at ``fwd_chunk`` steps per chunk;
* a training forward and its backward: ``bwd_layout`` -- "lanes" (:mod:`.gpu_lanes` and
  :mod:`.gpu_lanes_bwd`, a state of at most 16) or "channels" (:mod:`.gpu_channels`, one
  lane per channel, 128 channels per CTA); "auto" picks "lanes" up to 16 states, at
  ``chunk`` steps per chunk.

The state is zero-padded to a multiple of 16 (4 lanes per channel, and a lane's 4 B
values are one 16-byte load; padded states stay 0 and add nothing). ``interpret=True``
runs the kernels under Mosaic GPU's interpreter (the lanes kernels) or Pallas' grid
emulation (the one-lane-per-channel kernels; ``mosaic_interpret`` for the interpreter).
"""

from __future__ import annotations

import jax.numpy as jnp

from . import gpu_channels, gpu_lanes, gpu_lanes_bwd
from .common import Problem, SelectiveScanConfig, pad_cotangents, unpad_forward, unpad_gradients

STATE_MULTIPLE = 16  # the lanes kernels: 4 lanes per channel, 4 states per 16-byte load


def forward_chunk(config: SelectiveScanConfig, x, dt, B, C, z) -> int:
    """The chunk of a forward with no backward after it (``config.fwd_chunk``)."""
    if config.fwd_chunk == "auto":
        narrow = all(jnp.dtype(v.dtype).itemsize == 2 for v in (x, dt, B, C) + ((z,) if z is not None else ()))
        return 32 if narrow else 16
    return config.fwd_chunk


def bwd_layout(config: SelectiveScanConfig, n: int) -> str:
    """The training forward's and backward's layout for a state of ``n`` (``config.bwd_layout``;
    "auto": "lanes" up to 16 states, else "channels")."""
    if config.bwd_layout == "auto":
        return "lanes" if n <= 16 else "channels"
    return config.bwd_layout


def make_problem(config: SelectiveScanConfig, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk=None,
                 training=True) -> Problem:
    """The kernels' Problem. ``training=False``: a forward with no backward after it (its
    chunk is ``fwd_chunk`` unless ``chunk`` is given)."""
    chunk = chunk or (config.chunk if training else forward_chunk(config, x, dt, B, C, z))
    red_rows = min(config.red_rows, chunk)
    while chunk % red_rows:  # the largest divisor of the chunk up to the option
        red_rows -= 1
    return Problem(x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk, softplus, state_multiple=STATE_MULTIPLE,
                   unroll=config.unroll, bwd_unroll=config.bwd_unroll, red_rows=red_rows,
                   red_multiple=gpu_channels.ROW4_TILE)


def forward(config: SelectiveScanConfig, p: Problem, out_dtype, *, save_bounds=False, interpret=False):
    """(y (batch, time, chans), h_last (batch, chans, state), bounds or None)."""
    if not save_bounds or bwd_layout(config, p.n_real) == "lanes":
        outs = gpu_lanes.forward(config, p, out_dtype, interpret=bool(interpret), save_bounds=save_bounds)
    else:
        mode = "mosaic" if interpret and config.mosaic_interpret else bool(interpret)
        outs = gpu_channels.forward(config, p, out_dtype, save_bounds=save_bounds, interpret=mode)
    y, h_last = unpad_forward(p, outs[0], outs[1])
    return y, h_last, (outs[2] if save_bounds else None)


def backward(config: SelectiveScanConfig, p: Problem, gy, gh_last, bounds, dtypes, *, interpret=False):
    """Gradients: dict with x, dt, z, B, C, A, D, dt_bias, h0 (unpadded). ``gh_last`` is
    the cotangent of the final state (batch, chans, state)."""
    gy, ghl = pad_cotangents(p, gy, gh_last)
    if bwd_layout(config, p.n_real) == "lanes":
        return gpu_lanes_bwd.backward(config, p, gy, bounds, ghl, dtypes, interpret=bool(interpret))
    outs = gpu_channels.backward(config, p, gy, bounds, ghl, dtypes, interpret=bool(interpret))
    return unpad_gradients(p, outs, dbc_rows=p.red_rows)
