"""Pallas GPU (Triton) kernels of ``gated_linear_attention`` with no decay or one per head for
grouped q/k heads (Mamba-2's groups of B and C): the per-chunk kernels of
:mod:`mnemax.kernels.chunked_gpu` with ``hb`` value heads of one group per program
(``ChunkedConfig.group_heads``, :meth:`~mnemax.kernels.chunked_gpu.ChunkedConfig.heads_per_program`).
The chunk's ``q k^T`` is formed once for them, and the gradient kernel sums over them what is
linear in the heads (:func:`chunk_grads`), so dq and dk leave it once per ``hb`` heads instead
of once per value head. The state walks are :mod:`~mnemax.kernels.chunked_gpu`'s, unchanged.
Layouts as there; a program's blocks take ``hb`` consecutive value rows, which share one q/k row
(``hb`` divides the heads per group)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..chunked_gpu import ChunkedConfig, compiler_params, grads_stages, matmuls
from ..chunked_pallas import (
    F32,
    GATE_COLS,
    Problem,
    chunk_weights,
    col_to_row,
    decay_mask,
    dot,
    dot_nt,
    dot_tn,
    qk_row,
    row_to_col,
)


def _specs(p: Problem, hb: int):
    """BlockSpecs of the per-chunk kernels that run ``hb`` value heads per program (grid (BH /
    hb, NC)): program (r, c) runs chunk c of value rows ``r hb ... r hb + hb - 1``, which share
    one q/k row (``hb`` divides the heads per group); ``out`` is a (BH / hb, Tp, d_k) row."""
    L = p.L
    qk = qk_row(p)
    heads = lambda *s: pl.BlockSpec((hb, None, *s), lambda r, c: (r, c) + (0,) * len(s))  # noqa: E731
    return {"qk": pl.BlockSpec((None, L, p.d_k), lambda r, c: (qk(r * hb), c, 0)),
            "v": pl.BlockSpec((hb, L, p.d_v), lambda r, c: (r, c, 0)),
            "out": pl.BlockSpec((None, L, p.d_k), lambda r, c: (r, c, 0)),
            "gc": heads(L, GATE_COLS), "gr": heads(GATE_COLS, L), "S": heads(p.d_k, p.d_v)}


def _group_out_kernel(q_r, k_r, x_r, gc_r, gr_r, s_r, o_r, *, L, hb, nv, bv, scale, mm):
    """The outputs kernel of :mod:`~mnemax.kernels.chunked_gpu` for ``hb`` value heads sharing
    the chunk's q and k: ``q k^T`` once."""
    q = q_r[...]
    QK = dot_nt(q, k_r[...], mm)

    def head(h, carry):
        P = (QK * (decay_mask(gc_r, gr_r, L, strict=False, h=h) * scale)).astype(mm.dtype)
        qw = chunk_weights(gc_r, L, h).q_in * scale  # a row factor, applied after q S_h

        def block(j, carry):
            vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
            o_r[h, :, vc] = (dot(P, x_r[h, :, vc], mm) + qw * dot(q, s_r[h, :, vc], mm)).astype(o_r.dtype)
            return carry

        return lax.fori_loop(0, nv, block, carry)

    lax.fori_loop(0, hb, head, 0)


def outputs(p: Problem, states, out_dtype, *, hb: int, scale: float, config: ChunkedConfig, interpret: bool):
    """:func:`~mnemax.kernels.chunked_gpu.outputs` of the scalar-decay linear attention with
    ``hb`` value heads per program."""
    BH, NC = p.rows, p.n_chunks
    bv = config.value_block(p.d_v, split=True)
    sp = _specs(p, hb)
    return pl.pallas_call(
        functools.partial(_group_out_kernel, L=p.L, hb=hb, nv=p.d_v // bv, bv=bv, scale=scale,
                          mm=matmuls(p.q.dtype, interpret)[0]),
        grid=(BH // hb, NC), in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["S"]], out_specs=sp["v"],
        out_shape=jax.ShapeDtypeStruct((BH, NC * p.L, p.d_v), out_dtype),
        compiler_params=compiler_params(interpret, config.num_warps, config.num_stages), interpret=interpret,
    )(p.q, p.k, p.v, p.gcol, p.grow, states)


def _group_grads_kernel(q_r, k_r, v_r, do_r, gc_r, gr_r, s_r, ds_r, dq_r, dk_r, dv_r, dg_r, *, L, hb, nv, bv,
                        scale, mm):
    """One chunk's gradients for ``hb`` value heads sharing q and k (see
    :func:`chunk_grads`). Two passes over the heads: the query side (dP, dq, the scores',
    the query's and the carried state's part of dG, written to row 1 of the head's rows), dq
    written; then the key side (dk, dv, the keys' part of dG, row 0). Keeping the first part in
    a register array over the heads instead spilled 128-312 B per thread (compiled for sm_90 at
    Mamba-2's shape); written out, 8-56 B, the per-head kernel's 40 B."""
    QK = dot_nt(q_r[...], k_r[...], mm)
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    zk, zL, z1 = jnp.zeros(q_r.shape, F32), jnp.zeros((L, L), F32), jnp.zeros((L, 1), F32)

    def query_side(h, acc):
        dq, dPs = acc
        w = chunk_weights(gc_r, L, h)

        def block(j, a):
            dP, dQ, ga = a
            vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
            S, dO = s_r[h, :, vc], do_r[h, :, vc]
            ga = ga + jnp.sum(jnp.sum(S.astype(F32) * ds_r[h, :, vc].astype(F32), axis=1, keepdims=True), axis=0,
                              keepdims=True)
            return dP + dot_nt(dO, v_r[h, :, vc], mm), dQ + dot_nt(dO, S, mm), ga

        dP, dQ, ga = lax.fori_loop(0, nv, block, (zL, zk, jnp.zeros((1, 1), F32)))
        dPm = dP * (decay_mask(gc_r, gr_r, L, strict=False, h=h) * scale)
        qw = w.q_in * scale
        gP = dPm * QK
        dG = (jnp.sum(gP, axis=1, keepdims=True) - row_to_col(jnp.sum(gP, axis=0, keepdims=True), L)
              + qw * jnp.sum(q_r[...].astype(F32) * dQ, axis=1, keepdims=True) + jnp.where(last, w.a * ga, 0.0))
        dg_r[h, 1:2, :] = col_to_row(dG, L)
        return dq + dQ * qw, dPs + dPm

    dq, dPs = lax.fori_loop(0, hb, query_side, (zk, zL))
    dPs = dPs.astype(mm.dtype)
    dq_r[...] = (dq + dot(dPs, k_r[...], mm)).astype(dq_r.dtype)

    def key_side(h, dk):
        w = chunk_weights(gc_r, L, h)
        P = (QK * (decay_mask(gc_r, gr_r, L, strict=False, h=h) * scale)).astype(mm.dtype)
        k = k_r[...]
        k_out = (k.astype(F32) * w.k_out).astype(mm.dtype)

        def block(j, a):
            dk, gko = a
            vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
            dS = ds_r[h, :, vc]
            dKo = dot_nt(v_r[h, :, vc], dS, mm)
            dv_r[h, :, vc] = (dot_tn(P, do_r[h, :, vc], mm) + dot(k_out, dS, mm)).astype(dv_r.dtype)
            return dk + w.k_out * dKo, gko + jnp.sum(k.astype(F32) * dKo, axis=1, keepdims=True)

        dk, gko = lax.fori_loop(0, nv, block, (dk, z1))
        gk_out = w.k_out * gko
        dg_r[h, 0:1, :] = col_to_row(jnp.where(last, jnp.sum(gk_out, axis=0, keepdims=True), 0.0) - gk_out, L)
        return dk

    dk_r[...] = lax.fori_loop(0, hb, key_side, dot_tn(dPs, q_r[...], mm)).astype(dk_r.dtype)


def chunk_grads(p: Problem, do, states, dstates, *, hb: int, scale: float, config: ChunkedConfig, interpret: bool):
    """:func:`~mnemax.kernels.chunked_gpu.chunk_grads` of the scalar-decay linear attention
    (Mamba-2's SSD) where ``hb`` value heads share each q/k row: one program per ``hb`` heads and chunk forms the chunk's
    ``q k^T`` once and sums over its heads what is linear in them, per chunk::

        dq = sum_h scale exp(G_h) [fresh] (.) dO_h S_h^T + (sum_h dP_h (.) D_h scale) k
        dk = (sum_h dP_h (.) D_h scale)^T q + sum_h k_out_h (.) V_h dS_h^T

    with ``dP_h = dO_h V_h^T``: two (L, L, d_k) products per program instead of two per head,
    and dq, dk written once per ``hb`` heads, (BH / hb, Tp, d_k) float32 (the op sums the rest
    of each group). dv and the rows (dG in row 0, the kernel's two parts added here) are per
    value head as :func:`~mnemax.kernels.chunked_gpu.chunk_grads`'."""
    BH, NC, L = p.rows, p.n_chunks, p.L
    Tp = NC * L
    bv = config.value_block(p.d_v, split=True)
    sp = _specs(p, hb)
    mm, _ = matmuls(p.q.dtype, interpret, config)
    dq, dk, dv, rows = pl.pallas_call(
        functools.partial(_group_grads_kernel, L=L, hb=hb, nv=p.d_v // bv, bv=bv, scale=scale, mm=mm),
        grid=(BH // hb, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["v"], sp["gc"], sp["gr"], sp["S"], sp["S"]],
        out_specs=[sp["out"], sp["out"], sp["v"], sp["gr"]],
        out_shape=[jax.ShapeDtypeStruct((BH // hb, Tp, p.d_k), F32), jax.ShapeDtypeStruct((BH // hb, Tp, p.d_k), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32), jax.ShapeDtypeStruct((BH, NC, GATE_COLS, L), F32)],
        compiler_params=compiler_params(interpret, config.bwd_warps, grads_stages(p, config)), interpret=interpret,
    )(p.q, p.k, p.v, do, p.gcol, p.grow, states, dstates)
    return dq, dk, dv, rows.at[:, :, 0].add(rows[:, :, 1])
