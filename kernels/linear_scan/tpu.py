"""The ``pallas_tpu`` backend of ``linear_scan`` (Mosaic TPU): ``h_t = a_t * h_{t-1} + b_t``
on ``(batch, time, channels)`` (trailing dims flattened by :class:`.common.Layout`; resets
already folded into ``a``), from the float32 state ``h0``.

Grid (batch, lane block, chunk), chunk axis last and "arbitrary"; (chunk, 128) tiles in
VMEM (chunk a multiple of 16, ``LinearScanConfig.tpu_chunk``); inside a tile a log-depth
scan with sublane rolls (``pltpu.roll``), plus the carry from the previous tile kept in VMEM
scratch across the sequence. The forward can save the carry at every chunk start; the
fused backward walks the chunks in the opposite order, recomputes each tile's states from
its boundary and runs the adjoint ``lambda_t = g_t + a_{t+1} lambda_{t+1}`` as a second
tile scan: ``da_t = lambda_t h_{t-1}``, ``db_t = lambda_t``, ``dh0 = a_first
lambda_first``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import LANES, Layout, LinearScanConfig


# ----------------------------------------------------------------------------- TPU


def _tile_scan(A, Bv, carry, chunk: int, reverse: bool):
    """Inclusive scan of (A, Bv) down (or up) the sublanes of a tile, from ``carry`` (1, L)."""
    from jax.experimental.pallas import tpu as pltpu

    row = lax.broadcasted_iota(jnp.int32, A.shape, 0)
    s = 1
    while s < chunk:
        if reverse:
            a_n, b_n, valid = pltpu.roll(A, chunk - s, 0), pltpu.roll(Bv, chunk - s, 0), row < chunk - s
        else:
            a_n, b_n, valid = pltpu.roll(A, s, 0), pltpu.roll(Bv, s, 0), row >= s
        Bv = jnp.where(valid, A * b_n + Bv, Bv)
        A = jnp.where(valid, A * a_n, A)
        s *= 2
    return Bv + A * carry


def _edge(x, first: bool, chunk: int):
    i = 0 if first else chunk - 1
    return x[i : i + 1, :]


def _tpu_fwd_kernel(a_tile, b_tile, h0_tile, o_tile, *rest, chunk, reverse, save_bounds):
    *bnd, carry = rest

    @pl.when(pl.program_id(2) == 0)
    def _():
        carry[...] = h0_tile[...]

    if save_bounds:
        bnd[0][...] = carry[...]
    h = _tile_scan(a_tile[...].astype(jnp.float32), b_tile[...].astype(jnp.float32), carry[...], chunk, reverse)
    o_tile[...] = h.astype(o_tile.dtype)
    carry[...] = _edge(h, reverse, chunk)


def _tpu_bwd_kernel(a_tile, b_tile, g_tile, bnd_tile, da_tile, db_tile, dh0_tile, lam_c, anext_c, *, chunk, reverse):
    from jax.experimental.pallas import tpu as pltpu

    @pl.when(pl.program_id(2) == 0)
    def _():
        lam_c[...] = jnp.zeros_like(lam_c)
        anext_c[...] = jnp.zeros_like(anext_c)

    A = a_tile[...].astype(jnp.float32)
    bound = bnd_tile[...]
    h = _tile_scan(A, b_tile[...].astype(jnp.float32), bound, chunk, reverse)
    row = lax.broadcasted_iota(jnp.int32, A.shape, 0)
    # incoming state of each row: the previous row's state, the boundary at the edge
    if reverse:
        h_prev = jnp.where(row == chunk - 1, bound, pltpu.roll(h, chunk - 1, 0))
        coef = jnp.where(row == 0, anext_c[...], pltpu.roll(A, 1, 0))
    else:
        h_prev = jnp.where(row == 0, bound, pltpu.roll(h, 1, 0))
        coef = jnp.where(row == chunk - 1, anext_c[...], pltpu.roll(A, chunk - 1, 0))
    lam = _tile_scan(coef, g_tile[...].astype(jnp.float32), lam_c[...], chunk, not reverse)
    da_tile[...] = (lam * h_prev).astype(da_tile.dtype)
    db_tile[...] = lam.astype(db_tile.dtype)
    lam_c[...] = _edge(lam, not reverse, chunk)
    anext_c[...] = _edge(A, not reverse, chunk)
    dh0_tile[...] = anext_c[...] * lam_c[...]


def _tpu_forward(lay: Layout, a, b, h0, out_dtype, *, save_bounds, interpret):
    from jax.experimental.pallas import tpu as pltpu

    chunk, reverse, n_chunks = lay.chunk, lay.reverse, lay.n_chunks

    def tchunk(t):
        return n_chunks - 1 - t if reverse else t

    seq = pl.BlockSpec((None, chunk, LANES), lambda i, j, t: (i, tchunk(t), j))
    st = pl.BlockSpec((None, 1, LANES), lambda i, j, t: (i, 0, j))
    bnd = pl.BlockSpec((None, None, 1, LANES), lambda i, j, t: (i, tchunk(t), 0, j))
    out_shapes = [jax.ShapeDtypeStruct((lay.batch, lay.time_p, lay.lanes_p), out_dtype)]
    if save_bounds:
        out_shapes.append(jax.ShapeDtypeStruct((lay.batch, n_chunks, 1, lay.lanes_p), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, chunk=chunk, reverse=reverse, save_bounds=save_bounds),
        grid=(lay.batch, lay.lanes_p // LANES, n_chunks),
        in_specs=[seq, seq, st], out_specs=[seq] + ([bnd] if save_bounds else []), out_shape=out_shapes,
        scratch_shapes=[pltpu.VMEM((1, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(a, b, h0)
    return outs if save_bounds else (outs[0], None)


def _tpu_backward(lay: Layout, a, b, g, bounds, da_dtype, db_dtype, *, interpret):
    from jax.experimental.pallas import tpu as pltpu

    chunk, reverse, n_chunks = lay.chunk, lay.reverse, lay.n_chunks

    def tchunk(t):
        return t if reverse else n_chunks - 1 - t

    seq = pl.BlockSpec((None, chunk, LANES), lambda i, j, t: (i, tchunk(t), j))
    st = pl.BlockSpec((None, 1, LANES), lambda i, j, t: (i, 0, j))
    bnd = pl.BlockSpec((None, None, 1, LANES), lambda i, j, t: (i, tchunk(t), 0, j))
    seq_shape = (lay.batch, lay.time_p, lay.lanes_p)
    return pl.pallas_call(
        functools.partial(_tpu_bwd_kernel, chunk=chunk, reverse=reverse),
        grid=(lay.batch, lay.lanes_p // LANES, n_chunks),
        in_specs=[seq, seq, seq, bnd], out_specs=[seq, seq, st],
        out_shape=[jax.ShapeDtypeStruct(seq_shape, da_dtype), jax.ShapeDtypeStruct(seq_shape, db_dtype),
                   jax.ShapeDtypeStruct((lay.batch, 1, lay.lanes_p), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((1, LANES), jnp.float32), pltpu.VMEM((1, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(a, b, g, bounds)


# ----------------------------------------------------------------------------- entry points


def _interpret(interpret):
    if interpret:
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return False


def forward(config: LinearScanConfig, a, b, h0, *, reverse=False, save_bounds=False, interpret=False):
    """h (b's shape and dtype) and, if ``save_bounds``, the float32 chunk-boundary carries."""
    lay = Layout(b.shape, config.tpu_chunk, reverse, False)
    h, bounds = _tpu_forward(lay, lay.seq(a), lay.seq(b), lay.state(h0), b.dtype, save_bounds=save_bounds,
                             interpret=_interpret(interpret))
    return lay.unseq(h, b.dtype), bounds


def backward(config: LinearScanConfig, a, b, g, bounds, *, reverse=False, interpret=False):
    """(da, db, dh0) of the scan whose forward saved ``bounds``."""
    lay = Layout(b.shape, config.tpu_chunk, reverse, False)
    da, db, dh0 = _tpu_backward(lay, lay.seq(a), lay.seq(b), lay.seq(g.astype(b.dtype)), bounds, a.dtype, b.dtype,
                                interpret=_interpret(interpret))
    return lay.unseq(da, a.dtype), lay.unseq(db, b.dtype), lay.unstate(dh0)
