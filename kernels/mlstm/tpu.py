"""Pallas TPU (Mosaic) kernels for ``mlstm``, forward and backward: the chunk math of
:mod:`mnemax.kernels.mlstm.common` (:func:`~mnemax.kernels.mlstm.common.fwd_chunk`,
:func:`~mnemax.kernels.mlstm.common.bwd_chunk`) walked over the chunks of one
(batch, head) row in order, with the state ``(C, n, m)`` (and backward its gradient) in
VMEM scratch.

Grid: (batch*heads "parallel", chunks "arbitrary"). Blocks per grid cell:

==================  ===========================
array               block
==================  ===========================
q, k / v, h         (L, d_qk) / (L, d_v)
gates               (L, 8) and (8, L)
state C / n / m     (d_qk, d_v) / (1, d_qk) / (1, 1) f32 VMEM scratch
chunk bounds        (d_qk, d_v) per chunk (saved by the forward for the backward)
==================  ===========================

``L`` is ``chunk_size`` rounded to a multiple of 8 (and never more than the padded
length). The tiling rule (last two block dims multiples of (8, 128) or the full dims)
holds for any ``d_qk, d_v`` since those blocks span the full feature dims and the gate
tiles are full (L, 8) / (8, L) blocks. On real TPUs use ``L`` = 64 or 128 and ``d_qk,
d_v`` multiples of 128 (the MXU tile); VMEM per cell is about ``4 (L d_qk + L d_v + L^2 +
2 d_qk d_v)`` bytes plus double buffers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import F32, GATE_ROWS, Problem, bwd_chunk, fwd_chunk, gates_from_tiles, mm_dtype


def _tpu_fwd_kernel(q_r, k_r, v_r, gc_r, gr_r, C0_r, n0_r, m0_r, h_r, CT_r, nT_r, mT_r, *rest, scale, eps, mm, save):
    *bounds, C_s, n_s, m_s = rest

    @pl.when(pl.program_id(1) == 0)
    def _():
        C_s[...], n_s[...], m_s[...] = C0_r[...], n0_r[...], m0_r[...]

    C, n, m = C_s[...], n_s[...], m_s[...]
    if save:
        bounds[0][...], bounds[1][...], bounds[2][...] = C, n, m
    gc, gr = gates_from_tiles(gc_r[...], gr_r[...])
    h, C, n, m = fwd_chunk(q_r[...], k_r[...], v_r[...], gc, gr, C, n, m, scale=scale, eps=eps, mm=mm)
    h_r[...] = h.astype(h_r.dtype)
    C_s[...], n_s[...], m_s[...] = C, n, m
    CT_r[...], nT_r[...], mT_r[...] = C, n, m


def _tpu_bwd_kernel(q_r, k_r, v_r, dh_r, gc_r, gr_r, Cb_r, nb_r, mb_r, dCT_r, dnT_r, gmT_r,
                    dq_r, dk_r, dv_r, dg_r, dC0_r, dn0_r, gm0_r, dC_s, dn_s, gm_s, *, scale, eps, mm):
    @pl.when(pl.program_id(1) == 0)
    def _():
        dC_s[...], dn_s[...], gm_s[...] = dCT_r[...], dnT_r[...], gmT_r[...]

    gc, gr = gates_from_tiles(gc_r[...], gr_r[...])
    dq, dk, dv, di, dlogf, dC, dn, gm = bwd_chunk(
        q_r[...], k_r[...], v_r[...], dh_r[...], gc, gr, Cb_r[...], nb_r[...], mb_r[...], dC_s[...], dn_s[...],
        gm_s[...], scale=scale, eps=eps, mm=mm)
    dq_r[...], dk_r[...], dv_r[...] = dq.astype(dq_r.dtype), dk.astype(dk_r.dtype), dv.astype(dv_r.dtype)
    dg_r[...] = jnp.concatenate([di, dlogf, jnp.zeros((GATE_ROWS - 2, di.shape[1]), F32)], axis=0)
    dC_s[...], dn_s[...], gm_s[...] = dC, dn, gm
    dC0_r[...], dn0_r[...], gm0_r[...] = dC, dn, gm


def _specs(p: Problem, reverse: bool):
    NC, L = p.n_chunks, p.L

    def c_of(c):
        return NC - 1 - c if reverse else c

    return {
        "qk": pl.BlockSpec((None, L, p.d_qk), lambda b, c: (b, c_of(c), 0)),
        "v": pl.BlockSpec((None, L, p.d_v), lambda b, c: (b, c_of(c), 0)),
        "gc": pl.BlockSpec((None, None, L, GATE_ROWS), lambda b, c: (b, c_of(c), 0, 0)),
        "gr": pl.BlockSpec((None, None, GATE_ROWS, L), lambda b, c: (b, c_of(c), 0, 0)),
        "C": pl.BlockSpec((None, p.d_qk, p.d_v), lambda b, c: (b, 0, 0)),
        "n": pl.BlockSpec((None, 1, p.d_qk), lambda b, c: (b, 0, 0)),
        "m": pl.BlockSpec((None, 1, 1), lambda b, c: (b, 0, 0)),
        "Cb": pl.BlockSpec((None, None, p.d_qk, p.d_v), lambda b, c: (b, c_of(c), 0, 0)),
        "nb": pl.BlockSpec((None, None, 1, p.d_qk), lambda b, c: (b, c_of(c), 0, 0)),
        "mb": pl.BlockSpec((None, None, 1, 1), lambda b, c: (b, c_of(c), 0, 0)),
    }


def _state_shapes(BH, dk, dv, lead=()):
    return [jax.ShapeDtypeStruct((BH, *lead, dk, dv), F32), jax.ShapeDtypeStruct((BH, *lead, 1, dk), F32),
            jax.ShapeDtypeStruct((BH, *lead, 1, 1), F32)]


def _interpret(interpret):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams() if interpret else False


def forward(p: Problem, state, out_dtype, *, scale, eps, save, interpret):
    """h (BH, time_p, d_v), the final (C, n, m) and, with ``save``, each chunk's incoming
    state (the backward's bounds)."""
    from jax.experimental.pallas import tpu as pltpu

    BH, sp = p.q.shape[0], _specs(p, False)
    shapes = [jax.ShapeDtypeStruct((BH, p.n_chunks * p.L, p.d_v), out_dtype)] + _state_shapes(BH, p.d_qk, p.d_v)
    out_specs = [sp["v"], sp["C"], sp["n"], sp["m"]]
    if save:
        shapes += _state_shapes(BH, p.d_qk, p.d_v, (p.n_chunks,))
        out_specs += [sp["Cb"], sp["nb"], sp["mb"]]
    return pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, scale=scale, eps=eps, mm=mm_dtype(p.q.dtype), save=save),
        grid=(BH, p.n_chunks),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["C"], sp["n"], sp["m"]],
        out_specs=out_specs, out_shape=shapes,
        scratch_shapes=[pltpu.VMEM((p.d_qk, p.d_v), F32), pltpu.VMEM((1, p.d_qk), F32), pltpu.VMEM((1, 1), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret(interpret),
    )(p.q, p.k, p.v, p.gcol, p.grow, *state)


def backward(p: Problem, dh, bounds, dstate, *, scale, eps, interpret):
    """(dq, dk, dv, gate gradients (BH, NC, 8, L), dC0, dn0, gm0) in the kernels' layouts."""
    from jax.experimental.pallas import tpu as pltpu

    BH, sp = p.q.shape[0], _specs(p, True)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (p.q, p.k, p.v)]
    shapes += [jax.ShapeDtypeStruct((BH, p.n_chunks, GATE_ROWS, p.L), F32)] + _state_shapes(BH, p.d_qk, p.d_v)
    return pl.pallas_call(
        functools.partial(_tpu_bwd_kernel, scale=scale, eps=eps, mm=mm_dtype(p.q.dtype)),
        grid=(BH, p.n_chunks),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["v"], sp["gc"], sp["gr"], sp["Cb"], sp["nb"], sp["mb"],
                  sp["C"], sp["n"], sp["m"]],
        out_specs=[sp["qk"], sp["qk"], sp["v"], sp["gr"], sp["C"], sp["n"], sp["m"]],
        out_shape=shapes,
        scratch_shapes=[pltpu.VMEM((p.d_qk, p.d_v), F32), pltpu.VMEM((1, p.d_qk), F32), pltpu.VMEM((1, 1), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret(interpret),
    )(p.q, p.k, p.v, dh, p.gcol, p.grow, *bounds, *dstate)
