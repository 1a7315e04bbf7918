"""Pallas kernels for ``linear_scan``: ``h_t = a_t * h_{t-1} + b_t`` on GPU and TPU.

Both kernels see the problem as ``(batch, time, channels)`` (trailing dims flattened,
resets and ``h0`` already folded into ``a`` and ``b`` by
:func:`~mnemax.kernels.linear_scan.fold_inputs`), move the sequence in chunks of
``chunk`` steps and keep the carry in float32 on chip:

* ``pallas_gpu`` (Mosaic GPU, Hopper): one CTA (a warpgroup of 128 threads) per
  (batch, 128-channel block). ``plgpu.emit_pipeline`` streams (chunk, 128) tiles of
  ``a`` and ``b`` into shared memory with TMA, ``max_concurrent_steps`` chunks ahead
  of the recurrence; the recurrence walks the rows of a tile (each thread owns one
  channel, the carry lives in registers) and the output tile goes back by TMA. So
  every byte is read once and written once, in large bulk copies, and the latency of
  the sequential chain is spread over many channels. With ``interpret=True`` the same
  per-chunk body runs through ``pl.pallas_call``'s interpreter (a grid of (batch,
  channel block, chunk) with the carry in scratch), which proves the logic on CPU.
* ``pallas_tpu`` (Mosaic TPU): grid (batch, channel block, chunk) with the chunk axis
  last and "arbitrary"; (chunk, 128) tiles (chunk a multiple of 8, 16 for bf16) in
  VMEM; inside a tile a log-depth (Hillis-Steele) scan with sublane rolls
  (``pltpu.roll``), then the carry from the previous tile (a VMEM scratch that stays
  resident across the sequence) is added in: ``h = scan_b + cumprod_a * carry``.

The backward pass (see ``kernels/linear_scan.py``) is the same kernel run in the
other direction on the cotangents, so it needs no kernel of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LANES = 128


def _pad_to(x, axis: int, multiple: int):
    n = x.shape[axis]
    pad = (-n) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _as_3d(a, b):
    """(batch, time, *rest) -> (batch, time, channels), padded to whole tiles later."""
    batch, time = b.shape[:2]
    return a.reshape(batch, time, -1), b.reshape(batch, time, -1)


def default_chunk(dtype, platform: str) -> int:
    if platform == "tpu":
        return 32
    return 64 if jnp.dtype(dtype).itemsize <= 2 else 32


# ----------------------------------------------------------------------------- GPU


def _rows_body(a_tile, b_tile, o_tile, h, *, chunk: int, reverse: bool):
    """Runs the recurrence over the rows of one (chunk, lanes) tile; returns the carry."""

    def row(t, h):
        r = chunk - 1 - t if reverse else t
        h = a_tile[r].astype(jnp.float32) * h + b_tile[r].astype(jnp.float32)
        o_tile[r] = h.astype(o_tile.dtype)
        return h

    return lax.fori_loop(0, chunk, row, h, unroll=True)


def _gpu_mosaic(a, b, out_dtype, *, chunk: int, reverse: bool, stages: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, time, chans = b.shape
    n_chunks, n_blocks = time // chunk, chans // LANES

    def tmap(t):
        return n_chunks - 1 - t if reverse else t

    @functools.partial(
        plgpu.kernel,
        out_type=jax.ShapeDtypeStruct(b.shape, out_dtype),
        grid=(batch, n_blocks),
        grid_names=("batch", "block"),
    )
    def kernel(a_gmem, b_gmem, o_gmem):
        bi = lax.axis_index("batch")
        ci = lax.axis_index("block")
        spec = pl.BlockSpec((chunk, LANES), lambda t: (tmap(t), ci))

        def step(_, a_tile, b_tile, o_tile, h):
            return _rows_body(a_tile, b_tile, o_tile, h, chunk=chunk, reverse=reverse)

        plgpu.emit_pipeline(
            step,
            grid=(n_chunks,),
            in_specs=[spec, spec],
            out_specs=[spec],
            max_concurrent_steps=stages,
            init_carry=jnp.zeros((LANES,), jnp.float32),
        )(a_gmem.at[bi], b_gmem.at[bi], o_gmem.at[bi])

    return kernel(a, b)


def _gpu_interpret(a, b, out_dtype, *, chunk: int, reverse: bool):
    batch, time, chans = b.shape
    n_chunks = time // chunk

    def tmap(i, j, t):
        return (i, n_chunks - 1 - t if reverse else t, j)

    spec = pl.BlockSpec((None, chunk, LANES), tmap)

    def kernel(a_tile, b_tile, o_tile, carry):
        @pl.when(pl.program_id(2) == 0)
        def _():
            carry[...] = jnp.zeros_like(carry)

        carry[...] = _rows_body(a_tile, b_tile, o_tile, carry[...], chunk=chunk, reverse=reverse)

    from jax.experimental.pallas import mosaic_gpu as plgpu

    return pl.pallas_call(
        kernel,
        grid=(batch, chans // LANES, n_chunks),
        in_specs=[spec, spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(b.shape, out_dtype),
        scratch_shapes=[plgpu.SMEM((LANES,), jnp.float32)],
        interpret=True,
    )(a, b)


def scan_gpu(a, b, *, reverse: bool = False, chunk: int | None = None, stages: int = 2, interpret: bool = False):
    """Bare scan from a zero state on GPU; a, b: (batch, time, ...) same shape."""
    shape, out_dtype = b.shape, b.dtype
    a3, b3 = _as_3d(a, b)
    chunk = chunk or default_chunk(b.dtype, "gpu")
    time, chans = a3.shape[1], a3.shape[2]
    a3, b3 = (_pad_to(_pad_to(x, 1, chunk), 2, LANES) for x in (a3, b3))
    if interpret:
        h = _gpu_interpret(a3, b3, out_dtype, chunk=chunk, reverse=reverse)
    else:
        h = _gpu_mosaic(a3, b3, out_dtype, chunk=chunk, reverse=reverse, stages=stages)
    return h[:, :time, :chans].reshape(shape)


# ----------------------------------------------------------------------------- TPU


def _tpu_kernel(a_tile, b_tile, o_tile, carry, *, chunk: int, reverse: bool):
    from jax.experimental.pallas import tpu as pltpu

    @pl.when(pl.program_id(2) == 0)
    def _():
        carry[...] = jnp.zeros_like(carry)

    A = a_tile[...].astype(jnp.float32)
    Bv = b_tile[...].astype(jnp.float32)
    row = lax.broadcasted_iota(jnp.int32, A.shape, 0)
    s = 1
    while s < chunk:  # log-depth inclusive scan down (or up) the sublanes
        if reverse:
            a_next, b_next, valid = pltpu.roll(A, chunk - s, 0), pltpu.roll(Bv, chunk - s, 0), row < chunk - s
        else:
            a_next, b_next, valid = pltpu.roll(A, s, 0), pltpu.roll(Bv, s, 0), row >= s
        Bv = jnp.where(valid, A * b_next + Bv, Bv)
        A = jnp.where(valid, A * a_next, A)
        s *= 2
    h = Bv + A * carry[...]
    o_tile[...] = h.astype(o_tile.dtype)
    edge = 0 if reverse else chunk - 1
    carry[...] = h[edge : edge + 1, :]


def scan_tpu(a, b, *, reverse: bool = False, chunk: int | None = None, interpret=False):
    """Bare scan from a zero state on TPU; a, b: (batch, time, ...) same shape."""
    from jax.experimental.pallas import tpu as pltpu

    shape, out_dtype = b.shape, b.dtype
    a3, b3 = _as_3d(a, b)
    chunk = chunk or default_chunk(b.dtype, "tpu")
    if chunk % 16:
        raise ValueError(f"chunk must be a multiple of 16 (Mosaic TPU tiles), got {chunk}")
    time, chans = a3.shape[1], a3.shape[2]
    a3, b3 = (_pad_to(_pad_to(x, 1, chunk), 2, LANES) for x in (a3, b3))
    batch, time_p, chans_p = b3.shape
    n_chunks = time_p // chunk

    def tmap(i, j, t):
        return (i, n_chunks - 1 - t if reverse else t, j)

    spec = pl.BlockSpec((None, chunk, LANES), tmap)
    h = pl.pallas_call(
        functools.partial(_tpu_kernel, chunk=chunk, reverse=reverse),
        grid=(batch, chans_p // LANES, n_chunks),
        in_specs=[spec, spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(b3.shape, out_dtype),
        scratch_shapes=[pltpu.VMEM((1, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(a3, b3)
    return h[:, :time, :chans].reshape(shape)
