"""The ``pallas_gpu`` backend of ``linear_scan`` (Mosaic GPU, Hopper): ``h_t = a_t * h_{t-1}
+ b_t`` on ``(batch, time, channels)`` (trailing dims flattened by :class:`.common.Layout`;
resets already folded into ``a``), from the float32 state ``h0``, the carry in float32 on
chip; bf16 inputs stay bf16 in memory.

One CTA (a warpgroup of 128 threads) per (batch, 128-lane block); ``plgpu.emit_pipeline``
streams (chunk, 128) tiles into shared memory with TMA, ``stages`` chunks ahead of the
recurrence, which walks the rows of a tile with the carry in registers (one lane per
channel). bf16 is moved as uint32 pairs (two channels per lane, 4-byte accesses;
``LinearScanConfig.pack_bf16``).

Forward: besides ``h`` it can save the carry at the start of every chunk (``bounds``,
float32, 1/chunk of the data). Backward (one fused kernel): walks the chunks in the
opposite order, recomputes the chunk's states in float32 from its saved boundary, then
runs the adjoint ``lambda_t = g_t + a_{t+1} lambda_{t+1}`` back through the chunk and
writes ``da_t = lambda_t h_{t-1}`` and ``db_t = lambda_t``; ``dh0 = a_first
lambda_first``. Reads a, b, g once and writes da, db once.

With ``interpret=True`` the same per-chunk bodies run through ``pl.pallas_call``'s
interpreter on a (batch, block, chunk) grid with the carries in scratch: this proves the
logic on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import LANES, Layout, LinearScanConfig


# ----------------------------------------------------------------------------- per-row math


def _bits_to_f32(u, high: bool):
    """The bf16 in the low (or high) half of each uint32, as float32."""
    bits = (u & jnp.uint32(0xFFFF0000)) if high else (u << 16)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _f32_to_bf16_bits(x):
    """float32 -> bf16 bit pattern in the low 16 bits (round to nearest even)."""
    u = lax.bitcast_convert_type(x, jnp.uint32)
    return (u + jnp.uint32(0x7FFF) + ((u >> 16) & jnp.uint32(1))) >> 16


def _unpack(v, packed):
    """A tile row -> tuple of float32 lane vectors (2 if packed)."""
    if packed:
        return (_bits_to_f32(v, False), _bits_to_f32(v, True))
    return (v.astype(jnp.float32),)


def _pack(vals, packed, dtype):
    if packed:
        return _f32_to_bf16_bits(vals[0]) | (_f32_to_bf16_bits(vals[1]) << 16)
    return vals[0].astype(dtype)


def _fwd_rows(a_tile, b_tile, o_tile, h, *, chunk, reverse, packed):
    """Forward recurrence over the rows of a tile; h: tuple of carries."""

    def row(t, h):
        r = chunk - 1 - t if reverse else t
        a, b = _unpack(a_tile[r], packed), _unpack(b_tile[r], packed)
        h = tuple(ai * hi + bi for ai, bi, hi in zip(a, b, h))
        o_tile[r] = _pack(h, packed, o_tile.dtype)
        return h

    return lax.fori_loop(0, chunk, row, h, unroll=True)


def _bwd_rows(a_tile, b_tile, g_tile, da_tile, db_tile, hbuf, h, lam, a_next, *, chunk, reverse, packed):
    """Recompute the tile's states from ``h`` (the carry into the tile), keeping each
    row's incoming state in ``hbuf``; then the adjoint back through the rows."""
    k = len(h)

    def fwd(t, h):
        r = chunk - 1 - t if reverse else t
        for i in range(k):
            hbuf[i, r] = h[i]
        a, b = _unpack(a_tile[r], packed), _unpack(b_tile[r], packed)
        return tuple(ai * hi + bi for ai, bi, hi in zip(a, b, h))

    lax.fori_loop(0, chunk, fwd, h, unroll=True)

    def bwd(t, carry):
        lam, a_next = carry
        r = t if reverse else chunk - 1 - t
        g, a = _unpack(g_tile[r], packed), _unpack(a_tile[r], packed)
        lam = tuple(gi + ani * li for gi, ani, li in zip(g, a_next, lam))
        da_tile[r] = _pack(tuple(li * hbuf[i, r] for i, li in enumerate(lam)), packed, da_tile.dtype)
        db_tile[r] = _pack(lam, packed, db_tile.dtype)
        return lam, a

    return lax.fori_loop(0, chunk, bwd, (lam, a_next), unroll=True)


# ----------------------------------------------------------------------------- GPU


def _gpu_forward(lay: Layout, a, b, h0, out_dtype, *, save_bounds, stages, interpret):
    chunk, reverse, packed, k = lay.chunk, lay.reverse, lay.packed, lay.k
    batch, n_chunks, n_blocks = lay.batch, lay.n_chunks, lay.lanes_p // LANES
    kernel_dtype = jnp.uint32 if packed else out_dtype
    out_shapes = [jax.ShapeDtypeStruct((batch, lay.time_p, lay.lanes_p), kernel_dtype)]
    if save_bounds:
        out_shapes.append(jax.ShapeDtypeStruct((batch, n_chunks, k, lay.lanes_p), jnp.float32))

    def tchunk(t):
        return n_chunks - 1 - t if reverse else t

    def body(a_tile, b_tile, h0_tile, o_tile, bnd_tile, h, first):
        h = tuple(hi + first * h0_tile[i] for i, hi in enumerate(h))
        if bnd_tile is not None:
            for i in range(k):
                bnd_tile[i] = h[i]
        return _fwd_rows(a_tile, b_tile, o_tile, h, chunk=chunk, reverse=reverse, packed=packed)

    if interpret:
        seq = pl.BlockSpec((None, chunk, LANES), lambda i, j, t: (i, tchunk(t), j))
        st = pl.BlockSpec((None, k, LANES), lambda i, j, t: (i, 0, j))
        bnd = pl.BlockSpec((None, None, k, LANES), lambda i, j, t: (i, tchunk(t), 0, j))
        from jax.experimental.pallas import mosaic_gpu as plgpu

        def kernel(a_tile, b_tile, h0_tile, o_tile, *rest):
            *bnd_tile, carry = rest
            is_first = pl.program_id(2) == 0
            first = is_first.astype(jnp.float32)
            h = tuple(jnp.where(is_first, 0.0, carry[i]) for i in range(k))  # scratch starts uninitialised
            h = body(a_tile, b_tile, h0_tile, o_tile, bnd_tile[0] if bnd_tile else None, h, first)
            for i in range(k):
                carry[i] = h[i]

        outs = pl.pallas_call(
            kernel, grid=(batch, n_blocks, n_chunks), in_specs=[seq, seq, st],
            out_specs=[seq] + ([bnd] if save_bounds else []), out_shape=out_shapes,
            scratch_shapes=[plgpu.SMEM((k, LANES), jnp.float32)], interpret=True,
        )(a, b, h0)
        return outs if save_bounds else (outs[0], None)

    from jax.experimental.pallas import mosaic_gpu as plgpu

    @functools.partial(plgpu.kernel, out_type=tuple(out_shapes), grid=(batch, n_blocks), grid_names=("batch", "block"))
    def kernel(a_gmem, b_gmem, h0_gmem, o_gmem, *bnd_gmem):
        bi, ci = lax.axis_index("batch"), lax.axis_index("block")
        seq = pl.BlockSpec((chunk, LANES), lambda t: (tchunk(t), ci))
        st = pl.BlockSpec((k, LANES), lambda t: (0, ci))
        bnd = pl.BlockSpec((None, k, LANES), lambda t: (tchunk(t), 0, ci))
        zeros = tuple(jnp.zeros((LANES,), jnp.float32) for _ in range(k))

        def step(idx, a_tile, b_tile, h0_tile, o_tile, *rest):
            *bnd_tile, h = rest
            first = jnp.where(idx[0] == 0, 1.0, 0.0).astype(jnp.float32)
            return body(a_tile, b_tile, h0_tile, o_tile, bnd_tile[0] if bnd_tile else None, h, first)

        plgpu.emit_pipeline(
            step, grid=(n_chunks,), in_specs=[seq, seq, st], out_specs=[seq] + ([bnd] if save_bounds else []),
            max_concurrent_steps=stages, init_carry=zeros,
        )(a_gmem.at[bi], b_gmem.at[bi], h0_gmem.at[bi], o_gmem.at[bi], *[g.at[bi] for g in bnd_gmem])

    outs = kernel(a, b, h0)
    return outs if save_bounds else (outs[0], None)


def _gpu_backward(lay: Layout, a, b, g, bounds, da_dtype, db_dtype, *, stages, interpret):
    chunk, reverse, packed, k = lay.chunk, lay.reverse, lay.packed, lay.k
    batch, n_chunks, n_blocks = lay.batch, lay.n_chunks, lay.lanes_p // LANES
    seq_shape = (batch, lay.time_p, lay.lanes_p)
    out_shapes = [
        jax.ShapeDtypeStruct(seq_shape, jnp.uint32 if packed else da_dtype),
        jax.ShapeDtypeStruct(seq_shape, jnp.uint32 if packed else db_dtype),
        jax.ShapeDtypeStruct((batch, k, lay.lanes_p), jnp.float32),
    ]

    def tchunk(t):  # the adjoint walks the chunks against the scan direction
        return t if reverse else n_chunks - 1 - t

    def body(a_tile, b_tile, g_tile, bnd_tile, da_tile, db_tile, dh0_tile, hbuf, lam, a_next):
        h = tuple(bnd_tile[i] for i in range(k))
        lam, a_next = _bwd_rows(a_tile, b_tile, g_tile, da_tile, db_tile, hbuf, h, lam, a_next,
                                chunk=chunk, reverse=reverse, packed=packed)
        for i in range(k):
            dh0_tile[i] = a_next[i] * lam[i]
        return lam, a_next

    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        seq = pl.BlockSpec((None, chunk, LANES), lambda i, j, t: (i, tchunk(t), j))
        bnd = pl.BlockSpec((None, None, k, LANES), lambda i, j, t: (i, tchunk(t), 0, j))
        st = pl.BlockSpec((None, k, LANES), lambda i, j, t: (i, 0, j))

        def kernel(a_tile, b_tile, g_tile, bnd_tile, da_tile, db_tile, dh0_tile, hbuf, carry):
            is_first = pl.program_id(2) == 0  # scratch starts uninitialised
            lam = tuple(jnp.where(is_first, 0.0, carry[0, i]) for i in range(k))
            a_next = tuple(jnp.where(is_first, 0.0, carry[1, i]) for i in range(k))
            lam, a_next = body(a_tile, b_tile, g_tile, bnd_tile, da_tile, db_tile, dh0_tile, hbuf, lam, a_next)
            for i in range(k):
                carry[0, i] = lam[i]
                carry[1, i] = a_next[i]

        return pl.pallas_call(
            kernel, grid=(batch, n_blocks, n_chunks), in_specs=[seq, seq, seq, bnd],
            out_specs=[seq, seq, st], out_shape=out_shapes,
            scratch_shapes=[plgpu.SMEM((k, chunk, LANES), jnp.float32), plgpu.SMEM((2, k, LANES), jnp.float32)],
            interpret=True,
        )(a, b, g, bounds)

    @functools.partial(
        plgpu.kernel, out_type=tuple(out_shapes), grid=(batch, n_blocks), grid_names=("batch", "block"),
        scratch_types=[plgpu.SMEM((k, chunk, LANES), jnp.float32)],
    )
    def kernel(a_gmem, b_gmem, g_gmem, bnd_gmem, da_gmem, db_gmem, dh0_gmem, hbuf):
        bi, ci = lax.axis_index("batch"), lax.axis_index("block")
        seq = pl.BlockSpec((chunk, LANES), lambda t: (tchunk(t), ci))
        bnd = pl.BlockSpec((None, k, LANES), lambda t: (tchunk(t), 0, ci))
        st = pl.BlockSpec((k, LANES), lambda t: (0, ci))
        zeros = tuple(jnp.zeros((LANES,), jnp.float32) for _ in range(k))

        def step(_, a_tile, b_tile, g_tile, bnd_tile, da_tile, db_tile, dh0_tile, carry):
            lam, a_next = carry
            return body(a_tile, b_tile, g_tile, bnd_tile, da_tile, db_tile, dh0_tile, hbuf, lam, a_next)

        plgpu.emit_pipeline(
            step, grid=(n_chunks,), in_specs=[seq, seq, seq, bnd], out_specs=[seq, seq, st],
            max_concurrent_steps=stages, init_carry=(zeros, zeros),
        )(a_gmem.at[bi], b_gmem.at[bi], g_gmem.at[bi], bnd_gmem.at[bi], da_gmem.at[bi], db_gmem.at[bi], dh0_gmem.at[bi])

    return kernel(a, b, g, bounds)


# ----------------------------------------------------------------------------- entry points


def layout(config: LinearScanConfig, shape, a_dtype, b_dtype, reverse) -> Layout:
    bf16 = jnp.dtype(a_dtype) == jnp.bfloat16 and jnp.dtype(b_dtype) == jnp.bfloat16
    return Layout(shape, config.chunk, reverse, config.pack_bf16 and bf16)


def forward(config: LinearScanConfig, a, b, h0, *, reverse=False, save_bounds=False, interpret=False):
    """h (b's shape and dtype) and, if ``save_bounds``, the float32 chunk-boundary carries."""
    lay = layout(config, b.shape, a.dtype, b.dtype, reverse)
    h, bounds = _gpu_forward(lay, lay.seq(a), lay.seq(b), lay.state(h0), b.dtype, save_bounds=save_bounds,
                             stages=config.stages, interpret=bool(interpret))
    return lay.unseq(h, b.dtype), bounds


def backward(config: LinearScanConfig, a, b, g, bounds, *, reverse=False, interpret=False):
    """(da, db, dh0) of the scan whose forward saved ``bounds``."""
    lay = layout(config, b.shape, a.dtype, b.dtype, reverse)
    da, db, dh0 = _gpu_backward(lay, lay.seq(a), lay.seq(b), lay.seq(g.astype(b.dtype)), bounds, a.dtype, b.dtype,
                                stages=config.stages, interpret=bool(interpret))
    return lay.unseq(da, a.dtype), lay.unseq(db, b.dtype), lay.unstate(dh0)
