"""Pallas TPU (Mosaic) kernels for ``delta_rule`` with one log decay per key channel (Kimi
Delta Attention, KDA; fla's ``chunk_kda``): the per-channel chunk algebra of
:mod:`mnemax.kernels.gated_linear_attention.tpu` (transposed states; scores factored where
every chunk's decay spans at most ``SPAN_LIMIT`` nats, else sub-chunked with every exponent
<= 0, chosen per call) with the WY/UT representation of :mod:`mnemax.kernels.delta_rule.tpu`;
the equations are those of :mod:`mnemax.kernels.delta_rule.gpu_channel` (read its
docstring). With ``G`` (L, d_k) the cumulative log decay since the chunk's start, per chunk::

    K_ts   = sum_d k_td k_sd exp(G_td - G_sd)                    s < t, one segment
    N      = Diag(beta) K,   R = (I + N)^-1,   T = R Diag(beta)  unit lower triangular R
    U      = T V,   Wk = T k_in,   k_in = k * exp(G) [fresh],   X = U - Wk S_in
    A_ts   = scale sum_d q_td k_sd exp(G_td - G_sd)              s <= t, one segment
    o      = (scale q * exp(G) [fresh]) S_in + A X
    S_out  = Diag(exp(G_L) [carries]) S_in + (k * exp(G_L - G) [last])^T X

Backward, per chunk: the gradients of ``o`` and ``S_out`` with ``X`` for the values
(:func:`~mnemax.kernels.gated_linear_attention.tpu.chunk_backward`: dq, the A and k_out
parts of dk and dG, and ``dX = A^T dO + (k exp(G_L - G) [last]) dS_out``), then
``dS_in = Diag(exp(G_L) [carries]) dS_out + (scale q exp(G) [fresh])^T dO - Wk^T dX`` and
the terms through ``X = T (V - k_in S_in)``::

    Y      = dX S_in^T,   dT = dX V^T - Y k_in^T,   dv = T^T dX,   dk_in = -T^T Y
    dN     = -(R^T (dT Diag(beta)) R^T) [s < t, one segment],   dK = Diag(beta) dN
    dbeta  = colsum(R (.) dT) + rowsum(dN (.) K)
    dk    += exp(G) [fresh] (.) dk_in + dK^q + dK^k,   dG += k_in (.) dk_in + k (.) (dK^q - dK^k)

(``dK^q``, ``dK^k``: the key-key scores' gradients with respect to their two key sides,
:func:`~mnemax.kernels.gated_linear_attention.tpu.chunk_scores` with ``q = k``). ``dg``
is the reverse cumulative sum of ``dG`` inside each chunk.

Kernels: :func:`wy` (grid (rows, chunks), both "parallel": R, U, Wk of every chunk; the
inverse by :func:`~mnemax.kernels.delta_rule.common.unit_lower_inverse`, in float32), then the
walks of :mod:`mnemax.kernels.chunked_tpu`'s kind (rows "parallel", chunks "arbitrary", the
state or its gradient in a VMEM scratch): :func:`forward` (X, o, S_out; saves S_in and X)
and :func:`backward` (every gradient). Blocks per grid cell (features unpadded, full-dim
blocks; time padded to whole chunks of ``L``, a multiple of 8):

==========================  ==========================================
array                       block
==========================  ==========================================
q, k, G, Wk, dq, dk, dG     (L, d_k)  (G, Wk, dG float32)
v, U, X, o, dO, dv          (L, d_v)  (U float32, X the matmul dtype)
gates                       (L, 8) columns and (8, L) rows (segment, beta; G = 0 there)
R                           (L, L) float32
dbeta                       (8, L) rows (row 0), float32
chunk states                (d_v, d_k) per chunk (the matmul dtype)
initial / final state       (d_v, d_k) float32, one block per row
walk state / its gradient   (d_v, d_k) float32 VMEM scratch
==========================  ==========================================

Matmul operands are bfloat16 for 16-bit inputs, float32 at HIGHEST precision otherwise;
``K``, the inverse and its gradient run at the float32 policy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..chunked_pallas import (
    F32,
    GATE_COLS,
    ROW_BETA,
    col_to_row,
    decay_grad,
    dot,
    dot_nt,
    dot_tn,
    seq_out,
    state_in_t,
    state_out_t,
    step_out,
)
from ..chunked_tpu import gate_tiles, interpret_params, matmuls, pad_cotangent, parallel_params, walk_params
from ..gated_linear_attention.tpu import (
    by_form,
    channel_decay,
    channel_problem,
    chunk_backward,
    chunk_forward,
    chunk_scores,
    fits_factored,
    segment_mask,
    specs,
)
from .common import unit_lower_inverse


def _wy_kernel(k_r, v_r, G_r, gc_r, gr_r, r_r, u_r, wk_r, *, L, f32, factored):
    k, G = k_r[...].astype(F32), G_r[...]
    gc, gr, w = gate_tiles(gc_r, gr_r, L)
    N = chunk_scores(k, k, G, segment_mask(gc, gr, L, strict=True), f32, factored=factored) * w.beta
    R = unit_lower_inverse(N, L, f32)
    r_r[...] = R
    T = R * gr[ROW_BETA:ROW_BETA + 1, :]
    wk_r[...] = dot(T, k * channel_decay(G, w, L).q_in, f32)
    u_r[...] = dot(T, v_r[...].astype(F32), f32)


def wy(p, G, *, interpret: bool, factored: bool):
    """(R (BH, NC, L, L), U (BH, Tp, d_v), Wk (BH, Tp, d_k)), float32, for every chunk;
    ``factored``: the key scores' form (the caller checked every chunk's span)."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp = NC * L
    sp = specs(p)
    return pl.pallas_call(
        functools.partial(_wy_kernel, L=L, f32=matmuls(p.q.dtype)[1], factored=factored), name="_tpu_channel_wy_kernel",
        grid=(BH, NC), in_specs=[sp["k"], sp["v"], sp["k"], sp["gc"], sp["gr"]],
        out_specs=[sp["LL"], sp["v"], sp["k"]],
        out_shape=[jax.ShapeDtypeStruct((BH, NC, L, L), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32)],
        compiler_params=parallel_params(), interpret=interpret_params(interpret),
    )(p.k, p.v, G, p.gcol, p.grow)


def _fwd_kernel(q_r, k_r, u_r, wk_r, G_r, gc_r, gr_r, s0_r, o_r, sT_r, st_r, xo_r, S_s, *, L, scale, mm, factored):
    """One chunk: S_in saved, X = U - Wk S_in (saved), o and S_out."""

    @pl.when(pl.program_id(1) == 0)
    def _():
        S_s[...] = s0_r[...]

    S = S_s[...]
    X = u_r[...] - dot_nt(wk_r[...], S, mm)
    if st_r is not None:
        st_r[...] = S.astype(st_r.dtype)
        xo_r[...] = X.astype(xo_r.dtype)
    gc, gr, w = gate_tiles(gc_r, gr_r, L)
    G = G_r[...]
    o, S = chunk_forward(q_r[...].astype(F32), k_r[...].astype(F32), X, G, S, channel_decay(G, w, L),
                         segment_mask(gc, gr, L, strict=False), scale=scale, mm=mm, factored=factored)
    o_r[...] = o.astype(o_r.dtype)
    S_s[...] = S
    sT_r[...] = S


def forward(q, k, v, beta, g, state, cut, *, chunk_size: int, scale: float, save: bool, interpret: bool):
    """(o (B, H, T, d_v) in q's dtype, the final state (B, H, d_k, d_v) float32, with ``save``
    the backward's residuals (every chunk's incoming state (BH, NC, d_v, d_k) and X (BH, Tp,
    d_v), both in the matmul dtype, R, Wk), else None) for per-channel ``g`` (B, H, T, d_k);
    ``cut``: the resets as float32 or None."""
    from jax.experimental.pallas import tpu as pltpu

    p, G = channel_problem(q, k, v, g, beta, cut, chunk_size)
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp, dk, dv = NC * L, p.d_k, p.d_v
    mm, _ = matmuls(p.q.dtype)
    sp = specs(p)
    out_specs = [sp["v"], sp["state"]] + [sp["St"], sp["v"]] * save
    out_shape = ([jax.ShapeDtypeStruct((BH, Tp, dv), q.dtype), jax.ShapeDtypeStruct((BH, dv, dk), F32)]
                 + [jax.ShapeDtypeStruct((BH, NC, dv, dk), mm.dtype), jax.ShapeDtypeStruct((BH, Tp, dv), mm.dtype)]
                 * save)

    def kernel(*refs, factored):
        ins, (o_r, sT_r, *saved), S_s = refs[:8], refs[8:-1], refs[-1]
        saved = saved or [None, None]
        _fwd_kernel(*ins, o_r, sT_r, *saved, S_s, L=L, scale=scale, mm=mm, factored=factored)

    def run(factored):  # the WY preparation and the walk, both in the scores' form (by_form)
        R, U, Wk = wy(p, G, interpret=interpret, factored=factored)
        out = pl.pallas_call(
            functools.partial(kernel, factored=factored), grid=(BH, NC),
            in_specs=[sp["k"], sp["k"], sp["v"], sp["k"], sp["k"], sp["gc"], sp["gr"], sp["state"]],
            out_specs=out_specs, out_shape=out_shape, name="_tpu_channel_fwd_kernel",
            scratch_shapes=[pltpu.VMEM((dv, dk), F32)],
            compiler_params=walk_params(), interpret=interpret_params(interpret),
        )(p.q, p.k, U, Wk, G, p.gcol, p.grow, state_in_t(p, state))
        return (R, Wk, *out)

    R, Wk, o, S_T, *saved = by_form(fits_factored(G, L), run)
    residuals = (saved[0], saved[1], R, Wk) if save else None
    return seq_out(o, v.shape), state_out_t(S_T, state.shape), residuals


def _bwd_kernel(q_r, k_r, v_r, x_r, do_r, G_r, gc_r, gr_r, s_r, dsT_r, r_r, wk_r,
                dq_r, dk_r, dv_r, dg_r, db_r, ds0_r, dS_s, *, L, scale, mm, f32, factored):
    """One chunk of the adjoint walk (last chunk first) with its gradients."""

    @pl.when(pl.program_id(1) == 0)
    def _():
        dS_s[...] = dsT_r[...]

    gc, gr, w = gate_tiles(gc_r, gr_r, L)
    G, S, R = G_r[...], s_r[...], r_r[...]
    k = k_r[...].astype(F32)
    dec = channel_decay(G, w, L)
    c = chunk_backward(q_r[...].astype(F32), k, x_r[...].astype(F32), do_r[...], G, S, dS_s[...], dec,
                       segment_mask(gc, gr, L, strict=False), scale=scale, mm=mm, factored=factored)
    dX = c.dx
    new = c.dS - dot_tn(dX, wk_r[...], mm)
    dS_s[...] = new
    ds0_r[...] = new

    beta_row = gr[ROW_BETA:ROW_BETA + 1, :]
    T = R * beta_row
    k_in = k * dec.q_in
    Y = dot(dX, S, mm)
    dT = dot_nt(dX, v_r[...].astype(F32), mm) - dot_nt(Y, k_in, mm)
    dk_in = -dot_tn(T, Y, f32)
    strict = segment_mask(gc, gr, L, strict=True)
    dN = jnp.where(strict, -dot_nt(dot_tn(R, dT * beta_row, f32), R, f32), 0.0)
    K, dKq, dKk = chunk_scores(k, k, G, strict, f32, dA=dN * w.beta, factored=factored)
    dq_r[...] = c.dq.astype(dq_r.dtype)
    dk_r[...] = (c.dk + dec.q_in * dk_in + dKq + dKk).astype(dk_r.dtype)
    dv_r[...] = dot_tn(T, dX, f32).astype(dv_r.dtype)
    dg_r[...] = c.dG + k_in * dk_in + k * (dKq - dKk)
    dbeta = jnp.sum(R * dT, axis=0, keepdims=True) + col_to_row(jnp.sum(dN * K, axis=1, keepdims=True), L)
    db_r[...] = jnp.concatenate([dbeta, jnp.zeros((GATE_COLS - 1, L), F32)], axis=0)


def backward(q, k, v, beta, g, state, cut, saved, do, dfinal, *, chunk_size: int, scale: float, interpret: bool):
    """The cotangents (dq, dk, dv, dbeta, dg, dstate) of :func:`forward`'s (o, final state),
    in the inputs' shapes and dtypes; ``saved``: :func:`forward`'s residuals."""
    from jax.experimental.pallas import tpu as pltpu

    states, X, R, Wk = saved
    p, G = channel_problem(q, k, v, g, beta, cut, chunk_size)
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp, dk, dv = NC * L, p.d_k, p.d_v
    dt = p.q.dtype
    mm, f32 = matmuls(dt)
    sp = specs(p, reverse=True)
    dq, dk_, dv_, dG, rows, dS0 = by_form(fits_factored(G, L), lambda factored: pl.pallas_call(
        functools.partial(_bwd_kernel, L=L, scale=scale, mm=mm, f32=f32, factored=factored), grid=(BH, NC),
        in_specs=[sp["k"], sp["k"], sp["v"], sp["v"], sp["v"], sp["k"], sp["gc"], sp["gr"], sp["St"], sp["state"],
                  sp["LL"], sp["k"]],
        out_specs=[sp["k"], sp["k"], sp["v"], sp["k"], sp["rows"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct((BH, Tp, dk), dt), jax.ShapeDtypeStruct((BH, Tp, dk), dt),
                   jax.ShapeDtypeStruct((BH, Tp, dv), dt), jax.ShapeDtypeStruct((BH, Tp, dk), F32),
                   jax.ShapeDtypeStruct((BH, NC, GATE_COLS, L), F32), jax.ShapeDtypeStruct((BH, dv, dk), F32)],
        name="_tpu_channel_bwd_kernel", scratch_shapes=[pltpu.VMEM((dv, dk), F32)],
        compiler_params=walk_params(), interpret=interpret_params(interpret),
    )(p.q, p.k, p.v, X, pad_cotangent(p, do), G, p.gcol, p.grow, states, state_in_t(p, dfinal), R, Wk))
    dg = decay_grad(dG.reshape(BH, NC, L, dk)).reshape(dG.shape)
    return (seq_out(dq, q.shape).astype(q.dtype), seq_out(dk_, k.shape).astype(k.dtype),
            seq_out(dv_, v.shape).astype(v.dtype), step_out(rows[:, :, 0], beta.shape).astype(beta.dtype),
            seq_out(dg, g.shape).astype(g.dtype), state_out_t(dS0, state.shape).astype(state.dtype))
