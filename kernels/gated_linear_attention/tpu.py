"""Pallas TPU (Mosaic) kernels for ``gated_linear_attention`` with one log decay per key
channel (GLA's gate; fla's ``chunk_gla``): the walks of :mod:`mnemax.kernels.chunked_tpu`
(one kernel walks the chunks forward writing the outputs, one walks them back writing every
gradient, the state in a VMEM scratch) with the decay a row of ``d_k`` factors, and the
per-chunk algebra of :mod:`mnemax.kernels.gated_linear_attention.gpu` (read its docstring).

With ``G`` (L, d_k) the cumulative log decay since the chunk's start (per channel; resets
cut the chunk into segments, :mod:`mnemax.kernels.chunked`), ``[fresh]`` the steps the
incoming state reaches, ``[last]`` the chunk's last segment and ``[carries]`` a chunk
without a reset, per chunk::

    A_ts   = scale sum_d q_td k_sd exp(G_td - G_sd)              s <= t, one segment
    o      = (scale q * exp(G) [fresh]) S_in + A V
    S_out  = Diag(exp(G_L) [carries]) S_in + (k * exp(G_L - G) [last])^T V

and backward, with ``dA = scale dO V^T`` (masked as A) and ``dk_out = exp(G_L - G) [last]
(.) V dS_out^T``::

    dq     = scale exp(G) [fresh] (.) dO S_in^T + sum_s dA_ts k_s (.) exp(G_t - G_s)
    dk     = dk_out + sum_t dA_ts q_t (.) exp(G_t - G_s)
    dv     = A^T dO + (k * exp(G_L - G) [last]) dS_out
    dS_in  = Diag(exp(G_L) [carries]) dS_out + (scale q * exp(G) [fresh])^T dO
    dG     = q (.) dq - k (.) dk + [t = L] (colsum(k (.) dk_out) + exp(G_L) [carries] (.) rowsum(S_in (.) dS_out))

``dg`` is the reverse cumulative sum of ``dG`` inside each chunk
(:func:`~mnemax.kernels.chunked_pallas.decay_grad`).

``A`` and its gradients take one of two forms, chosen per call (:func:`by_form`, one
``lax.cond`` outside the kernels, as the GPU kernels' ``form_per_call``): where every chunk's
decay spans at most :data:`~mnemax.kernels.chunked.SPAN_LIMIT` nats in every channel, one
matmul of ``q exp(G - c)`` and ``k exp(c - G)``, ``c`` the middle of each channel's range in
the chunk (:func:`factored_scores`; factors within ``exp(+-SPAN_LIMIT / 2)``); else in
sub-chunks of ``c`` = 16 steps (8 where 16 does not divide the chunk;
:func:`sub_chunk_scores`): the key steps of a row sub-chunk's own sub-chunk exactly, one key
step at a time as (c, d_k) products (the diagonal (c, c, d_k) block a slice at a time, no
lane-dim insertion); the earlier sub-chunks as one matmul factored around ``r``, the step
before the sub-chunk: ``(q_t exp(G_t - G_r)) . (k_s exp(G_r - G_s))``. There every exponent
is <= 0, so no gate, however strong, overflows.

Grids are (rows "parallel", chunks "arbitrary"), as in :mod:`mnemax.kernels.chunked_tpu`.
States travel transposed, (d_v, d_k) per row, so that every per-channel factor (``exp(G_L)``,
the rows of ``G``) is a (1, d_k) row broadcasting over the state. Blocks per grid cell
(features unpadded, full-dim blocks; time padded to whole chunks of ``L``, a multiple of 8):

==========================  ==========================================
array                       block
==========================  ==========================================
q, k, G, dq, dk, dG         (L, d_k)  (G, dG float32)
v, o, dO, dv                (L, d_v)
gates                       (L, 8) columns and (8, L) rows (segment; G = 0 there)
chunk states                (d_v, d_k) per chunk (the matmul dtype)
initial / final state       (d_v, d_k) float32, one block per row
walk state / its gradient   (d_v, d_k) float32 VMEM scratch
==========================  ==========================================

Matmul operands are bfloat16 for 16-bit inputs, float32 at HIGHEST precision otherwise
(:func:`~mnemax.kernels.chunked_tpu.matmuls`), always with float32 accumulation and a
float32 carried state.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..chunked import SUB_CHUNK, factorable, mid_range
from ..chunked_pallas import (
    F32,
    ROW_SEG,
    Matmul,
    Problem,
    Weights,
    decay_grad,
    dot,
    dot_nt,
    dot_tn,
    pad_axis,
    seq_out,
    state_in_t,
    state_out_t,
)
from ..chunked_tpu import (
    chunk_specs,
    gate_tiles,
    interpret_params,
    make_problem,
    matmuls,
    pad_cotangent,
    walk_params,
)

# ----------------------------------------------------------------------------- layout


def channel_problem(q, k, v, g, beta, cut, chunk_size: int):
    """(the TPU :class:`~mnemax.kernels.chunked_pallas.Problem` of q, k, v, ``beta`` (the delta
    rule's, or None) and the resets ``cut``, no decay in its gate columns; ``G`` (BH, Tp, d_k)
    float32, the cumulative log decay of ``g`` (B, H, T, d_k) inside each chunk, zero on padded
    steps)."""
    p = make_problem(q, k, v, None, beta, cut, chunk_size)
    B, H, T, dk = g.shape
    G = pad_axis(g.astype(F32).reshape(B * H, T, dk), 1, p.n_chunks * p.L)
    return p, jnp.cumsum(G.reshape(B * H, p.n_chunks, p.L, dk), axis=2).reshape(B * H, -1, dk)


def specs(p: Problem, reverse: bool = False):
    """:func:`~mnemax.kernels.chunked_tpu.chunk_specs` with the transposed states: ``"St"``
    (d_v, d_k) per chunk and ``"state"`` (d_v, d_k) per row."""
    NC = p.n_chunks
    sp = chunk_specs(p, reverse)
    sp["St"] = pl.BlockSpec((None, None, p.d_v, p.d_k), lambda b, c: (b, NC - 1 - c if reverse else c, 0, 0))
    sp["state"] = pl.BlockSpec((None, p.d_v, p.d_k), lambda b, c: (b, 0, 0))
    return sp


# ----------------------------------------------------------------------------- in-kernel math


def segment_mask(gc, gr, L: int, *, strict: bool):
    """(L, L) bool: ``s <= t`` (``s < t`` with ``strict``) in one segment, from the gate tiles."""
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    causal = (col < row) if strict else (col <= row)
    return causal & (gc[:, ROW_SEG:ROW_SEG + 1] == gr[ROW_SEG:ROW_SEG + 1, :])


class Decay(NamedTuple):
    """A chunk's per-channel decay factors ((L, d_k) unless noted), every exponent <= 0."""

    q_in: jax.Array  # exp(G_t) where the incoming state reaches t, else 0
    k_out: jax.Array  # exp(G_L - G_s) where s is in the last segment, else 0
    a: jax.Array  # (1, d_k) the incoming state's decay over the chunk (0 after a reset)


def channel_decay(G, w: Weights, L: int) -> Decay:
    """:class:`Decay` from ``G`` (L, d_k) and the segment weights ``w`` of
    :func:`~mnemax.kernels.chunked_tpu.gate_tiles` (whose ``G`` is 0)."""
    G_L = G[L - 1:L, :]
    return Decay(w.q_in * jnp.exp(G), w.k_out * jnp.exp(G_L - G), w.a * jnp.exp(G_L))


def sub_chunk_scores(q, k, G, mask, mm: Matmul, dA=None):
    """``A_ts = sum_d q_td k_sd exp(G_td - G_sd)`` (L, L) float32 where ``mask`` (L, L), else 0
    (unscaled), from float32 (L, d) values ``q``, ``k`` and ``G``. With ``dA`` (L, L) (the
    gradient of the scaled scores) also returns dq and dk (L, d) float32, the scores'
    gradients with respect to q and k.

    Row sub-chunk ``i`` (rows ``r0 .. r0 + c``, a (c, L) block of ``A``): its own key steps
    ``s`` one at a time (``k_s`` and ``G_s`` rows broadcast over the (c, d) rows, exponent
    ``G_t - G_s`` for t >= s), the earlier keys by one matmul of ``q exp(G_t - G_r)`` and ``k
    exp(G_r - G_s)`` (r = r0 - 1, keys s <= r). The row blocks concatenate along sublanes."""
    L, d = q.shape
    C = SUB_CHUNK if L % SUB_CHUNK == 0 else 8
    grads = dA is not None
    key = lax.broadcasted_iota(jnp.int32, (L, 1), 0)
    col = lax.broadcasted_iota(jnp.int32, (C, L), 1)
    row = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    A_rows, dq_rows, dk_rows = [], [], []
    dk_off = jnp.zeros((L, d), F32)
    for i in range(L // C):
        r0 = i * C
        q_i, k_i, G_i, m_i = q[r0:r0 + C], k[r0:r0 + C], G[r0:r0 + C], mask[r0:r0 + C]
        A_i = jnp.zeros((C, L), F32)
        if grads:
            dA_i = jnp.where(m_i, dA[r0:r0 + C], 0.0)
            dq_i = dk_i = jnp.zeros((C, d), F32)
        for j in range(C):
            E = jnp.exp(jnp.where(row >= j, G_i - G_i[j:j + 1], -jnp.inf))  # (c, d)
            kE = k_i[j:j + 1] * E
            A_i = A_i + jnp.where(col == r0 + j, jnp.sum(q_i * kE, axis=1, keepdims=True), 0.0)
            if grads:
                dA_s = jnp.sum(jnp.where(col == r0 + j, dA_i, 0.0), axis=1, keepdims=True)  # (c, 1)
                dq_i = dq_i + dA_s * kE
                dk_i = dk_i + jnp.where(row == j, jnp.sum(dA_s * q_i * E, axis=0, keepdims=True), 0.0)
        if i > 0:
            G_r = G[r0 - 1:r0]
            F_q = jnp.exp(G_i - G_r)  # (c, d)
            E_k = jnp.exp(jnp.where(key < r0, G_r - G, -jnp.inf))  # (L, d), 0 from the sub-chunk on
            Q_r, K_r = q_i * F_q, k * E_k
            A_i = A_i + dot_nt(Q_r, K_r, mm)
            if grads:
                dq_i = dq_i + F_q * dot(dA_i, K_r, mm)
                dk_off = dk_off + E_k * dot_tn(dA_i, Q_r, mm)
        A_rows.append(jnp.where(m_i, A_i, 0.0))
        if grads:
            dq_rows.append(dq_i)
            dk_rows.append(dk_i)
    A = jnp.concatenate(A_rows, axis=0)
    if not grads:
        return A
    return A, jnp.concatenate(dq_rows, axis=0), dk_off + jnp.concatenate(dk_rows, axis=0)


def factored_scores(q, k, G, mask, dA=None):
    """:func:`sub_chunk_scores`' values for a chunk whose decay spans at most
    :data:`~mnemax.kernels.chunked.SPAN_LIMIT` nats in every channel: ``A = (q exp(G - c))
    (k exp(c - G))^T`` where ``mask``, ``c`` (1, d) the middle of each channel's range of
    ``G``, so that every factor is within ``exp(+-SPAN_LIMIT / 2)`` (the masked entries above
    the diagonal, up to ``exp(SPAN_LIMIT)`` times |q||k|, stay finite and are dropped); with
    ``dA``: ``dq = exp(G - c) (.) dA (k exp(c - G))`` and ``dk = exp(c - G) (.) dA^T (q exp(G -
    c))``. One (L, L) matmul in place of the sub-chunks' per-step products, at the float32
    policy whatever the inputs' dtype (Mosaic's fp32 contraction; the GPU kernels' factored
    scores take TF32 there): bf16-rounded factors put the outputs' error past the bf16 test's
    3e-3 (3.4e-3 in interpret mode)."""
    f32 = matmuls(F32)[1]
    c = mid_range(G)
    F_q, F_k = jnp.exp(G - c), jnp.exp(c - G)
    P, M = q * F_q, k * F_k
    A = jnp.where(mask, dot_nt(P, M, f32), 0.0)
    if dA is None:
        return A
    dA = jnp.where(mask, dA, 0.0)
    return A, F_q * dot(dA, M, f32), F_k * dot_tn(dA, P, f32)


def chunk_scores(q, k, G, mask, mm: Matmul, dA=None, *, factored: bool):
    """:func:`factored_scores` (``factored``: the caller checked every chunk's span; float32
    products) or :func:`sub_chunk_scores` (products at ``mm``)."""
    return factored_scores(q, k, G, mask, dA=dA) if factored else sub_chunk_scores(q, k, G, mask, mm, dA=dA)


def fits_factored(G, L: int):
    """Whether every chunk of ``G`` (BH, Tp, d_k) spans at most
    :data:`~mnemax.kernels.chunked.SPAN_LIMIT` nats in every channel (a traced bool): the
    ``xla`` form's test (:func:`~mnemax.kernels.chunked.factorable`) on the kernels' layout."""
    return factorable(G.reshape(-1, L, G.shape[-1]))


def by_form(fits, run):
    """``run(factored)`` with ``factored = fits`` (:func:`fits_factored`), by one ``lax.cond``
    outside the kernels: both kernel sets are lowered, one runs; the per-chunk kernels hold
    one form each."""
    return lax.cond(fits, lambda: run(True), lambda: run(False))


def chunk_forward(q, k, x, G, S, dec: Decay, mask, *, scale: float, mm: Matmul, factored: bool):
    """One chunk's (o (L, d_v), S_out (d_v, d_k)) float32 from q, k, ``G`` (L, d_k), the
    values ``x`` (L, d_v) and S_in (d_v, d_k) (transposed); ``factored``: the scores' form
    (:func:`chunk_scores`)."""
    A = chunk_scores(q, k, G, mask, mm, factored=factored) * scale
    o = dot(A, x, mm) + dot_nt(q * (dec.q_in * scale), S, mm)
    return o, dec.a * S + dot_tn(x, k * dec.k_out, mm)


class ChunkGrads(NamedTuple):
    """One chunk's gradients through its outputs and S_out, float32."""

    A: jax.Array  # (L, L) the scaled scores
    dq: jax.Array  # (L, d_k)
    dk: jax.Array  # (L, d_k)
    dG: jax.Array  # (L, d_k)
    dx: jax.Array  # (L, d_v) A^T dO + (k k_out) dS_out, the values' gradient
    dS: jax.Array  # (d_v, d_k) dS_in (transposed)


def chunk_backward(q, k, x, dO, G, S, dS, dec: Decay, mask, *, scale: float, mm: Matmul,
                   factored: bool) -> ChunkGrads:
    """The gradients of one chunk's o and S_out (:func:`chunk_forward`) given dO (L, d_v), S_in
    and dS_out (d_v, d_k) (see the module docstring)."""
    L = q.shape[0]
    dA = dot_nt(dO, x, mm) * scale
    A, dq_a, dk_a = chunk_scores(q, k, G, mask, mm, dA=dA, factored=factored)
    A = A * scale
    qw = dec.q_in * scale
    dq = dot(dO, S, mm) * qw + dq_a
    dk_out = dec.k_out * dot(x, dS, mm)
    dk = dk_out + dk_a
    k_out = k * dec.k_out
    dx = dot_tn(A, dO, mm) + dot_nt(k_out, dS, mm)
    ga = jnp.sum(S.astype(F32) * dS, axis=0, keepdims=True)  # (1, d_k)
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    dG = q * dq - k * dk + jnp.where(last, jnp.sum(k * dk_out, axis=0, keepdims=True) + dec.a * ga, 0.0)
    return ChunkGrads(A, dq, dk, dG, dx, dec.a * dS + dot_tn(dO, q * qw, mm))


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(q_r, k_r, v_r, G_r, gc_r, gr_r, s0_r, o_r, sT_r, st_r, S_s, *, L, scale, mm, factored):
    """One chunk: S_in saved, o and S_out."""

    @pl.when(pl.program_id(1) == 0)
    def _():
        S_s[...] = s0_r[...]

    S = S_s[...]
    if st_r is not None:
        st_r[...] = S.astype(st_r.dtype)
    gc, gr, w = gate_tiles(gc_r, gr_r, L)
    G = G_r[...]
    o, S = chunk_forward(q_r[...].astype(F32), k_r[...].astype(F32), v_r[...].astype(F32), G, S,
                         channel_decay(G, w, L), segment_mask(gc, gr, L, strict=False), scale=scale, mm=mm,
                         factored=factored)
    o_r[...] = o.astype(o_r.dtype)
    S_s[...] = S
    sT_r[...] = S


def forward(q, k, v, g, state, cut, *, chunk_size: int, scale: float, save: bool, interpret: bool):
    """(o (B, H, T, d_v) in q's dtype, the final state (B, H, d_k, d_v) float32, with ``save``
    every chunk's incoming state (BH, NC, d_v, d_k) in the matmul dtype, else None) for
    per-channel ``g`` (B, H, T, d_k); ``cut``: the resets as float32 or None."""
    from jax.experimental.pallas import tpu as pltpu

    p, G = channel_problem(q, k, v, g, None, cut, chunk_size)
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    dk, dv = p.d_k, p.d_v
    mm, _ = matmuls(p.q.dtype)
    sp = specs(p)
    out_specs = [sp["v"], sp["state"]] + [sp["St"]] * save
    out_shape = ([jax.ShapeDtypeStruct((BH, NC * L, dv), q.dtype), jax.ShapeDtypeStruct((BH, dv, dk), F32)]
                 + [jax.ShapeDtypeStruct((BH, NC, dv, dk), mm.dtype)] * save)

    def kernel(*refs, factored):
        ins, (o_r, sT_r, *st_r), S_s = refs[:7], refs[7:-1], refs[-1]
        _fwd_kernel(*ins, o_r, sT_r, st_r[0] if save else None, S_s, L=L, scale=scale, mm=mm, factored=factored)

    o, S_T, *states = by_form(fits_factored(G, L), lambda factored: pl.pallas_call(
        functools.partial(kernel, factored=factored), grid=(BH, NC),
        in_specs=[sp["k"], sp["k"], sp["v"], sp["k"], sp["gc"], sp["gr"], sp["state"]],
        out_specs=out_specs, out_shape=out_shape, name="_tpu_channel_fwd_kernel",
        scratch_shapes=[pltpu.VMEM((dv, dk), F32)],
        compiler_params=walk_params(), interpret=interpret_params(interpret),
    )(p.q, p.k, p.v, G, p.gcol, p.grow, state_in_t(p, state)))
    return seq_out(o, v.shape), state_out_t(S_T, state.shape), (states[0] if save else None)


def _bwd_kernel(q_r, k_r, v_r, do_r, G_r, gc_r, gr_r, s_r, dsT_r, dq_r, dk_r, dv_r, dg_r, ds0_r, dS_s, *, L, scale,
                mm, factored):
    """One chunk of the adjoint walk (last chunk first) with its gradients."""

    @pl.when(pl.program_id(1) == 0)
    def _():
        dS_s[...] = dsT_r[...]

    gc, gr, w = gate_tiles(gc_r, gr_r, L)
    G = G_r[...]
    c = chunk_backward(q_r[...].astype(F32), k_r[...].astype(F32), v_r[...].astype(F32), do_r[...], G, s_r[...],
                       dS_s[...], channel_decay(G, w, L), segment_mask(gc, gr, L, strict=False), scale=scale, mm=mm,
                       factored=factored)
    dS_s[...] = c.dS
    ds0_r[...] = c.dS
    dq_r[...] = c.dq.astype(dq_r.dtype)
    dk_r[...] = c.dk.astype(dk_r.dtype)
    dv_r[...] = c.dx.astype(dv_r.dtype)
    dg_r[...] = c.dG


def backward(q, k, v, g, state, cut, states, do, dfinal, *, chunk_size: int, scale: float, interpret: bool):
    """The cotangents (dq, dk, dv, dg, dstate) of :func:`forward`'s (o, final state), in the
    inputs' shapes and dtypes; ``states``: :func:`forward`'s saved incoming states."""
    from jax.experimental.pallas import tpu as pltpu

    p, G = channel_problem(q, k, v, g, None, cut, chunk_size)
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp, dk, dv = NC * L, p.d_k, p.d_v
    dt = p.q.dtype
    sp = specs(p, reverse=True)
    dq, dk_, dv_, dG, dS0 = by_form(fits_factored(G, L), lambda factored: pl.pallas_call(
        functools.partial(_bwd_kernel, L=L, scale=scale, mm=matmuls(dt)[0], factored=factored), grid=(BH, NC),
        in_specs=[sp["k"], sp["k"], sp["v"], sp["v"], sp["k"], sp["gc"], sp["gr"], sp["St"], sp["state"]],
        out_specs=[sp["k"], sp["k"], sp["v"], sp["k"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct((BH, Tp, dk), dt), jax.ShapeDtypeStruct((BH, Tp, dk), dt),
                   jax.ShapeDtypeStruct((BH, Tp, dv), dt), jax.ShapeDtypeStruct((BH, Tp, dk), F32),
                   jax.ShapeDtypeStruct((BH, dv, dk), F32)],
        name="_tpu_channel_bwd_kernel", scratch_shapes=[pltpu.VMEM((dv, dk), F32)],
        compiler_params=walk_params(), interpret=interpret_params(interpret),
    )(p.q, p.k, p.v, pad_cotangent(p, do), G, p.gcol, p.grow, states, state_in_t(p, dfinal)))
    dg = decay_grad(dG.reshape(BH, NC, L, dk)).reshape(dG.shape)
    return (seq_out(dq, q.shape).astype(q.dtype), seq_out(dk_, k.shape).astype(k.dtype),
            seq_out(dv_, v.shape).astype(v.dtype), seq_out(dg, g.shape).astype(g.dtype),
            state_out_t(dS0, state.shape).astype(state.dtype))
