"""Pallas TPU (Mosaic) kernels the matrix-state ops share: ``gated_linear_attention`` and
``delta_rule`` with no decay or one log decay per head. The algebra is that of
:mod:`mnemax.kernels.chunked_gpu` (read its docstring): with ``G_t`` the cumulative log
decay since the chunk's start and ``D_ts = exp(G_t - G_s)`` for ``s <= t`` in one segment,
per chunk::

    X      = V                       (linear attention)
    X      = U - Wk S_in             (delta rule; U = T V, Wk = T K~ from
                                      :mod:`mnemax.kernels.delta_rule.tpu`)
    o      = (scale q * exp(G) [fresh]) S_in + (scale q k^T (.) D) X
    S_out  = exp(G_L) [no reset] S_in + (k * exp(G_L - G) [last segment])^T X

On a TPU the grid runs in order on a core, so the sequential walk and the per-chunk work
share one kernel each way (as :mod:`mnemax.kernels.mlstm.tpu` does):

1. :func:`forward`: grid (rows "parallel", chunks "arbitrary"), the state in a VMEM scratch;
   cell (b, c) reads S_in, forms X (delta rule), writes the chunk's outputs and S_out, and
   (``save``) saves S_in and X for the backward;
2. :func:`backward`: the same grid walked from the last chunk, the outgoing-state gradient
   ``dS`` in a VMEM scratch; cell (b, c) forms ``dX = P^T dO + (k k_out) dS`` (delta rule),
   the chunk's dq, dk, dv and the rows (dG, dbeta) (the per-chunk gradients of
   :func:`mnemax.kernels.chunked_gpu.chunk_grads`, whole value width at once), then
   ``dS <- a dS + (scale q q_in)^T dO [- Wk^T dX]``.

Blocks per grid cell (features are not padded: their blocks span the full dims, so the
tiling rule -- last two block dims multiples of (8, 128) or the full dims -- holds for any
``d_k, d_v``; time is padded to whole chunks of ``L``, a multiple of 8):

==========================  ==========================================
array                       block
==========================  ==========================================
q, k, Wk / v, U, X, o, dO   (L, d_k) / (L, d_v)
gates                       (L, 8) columns and (8, L) rows (G, segment, beta)
R (delta rule)              (L, L) float32
chunk states                (d_k, d_v) per chunk (the matmul dtype)
initial / final state       (d_k, d_v) float32, one block per row
walk state / its gradient   (d_k, d_v) float32 VMEM scratch
==========================  ==========================================

Matmul operands are bfloat16 for 16-bit inputs, float32 at HIGHEST precision otherwise,
always with float32 accumulation and a float32 carried state. On real TPUs use ``L`` = 64
or 128 and ``d_k, d_v`` multiples of 128 (the MXU tile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .chunked_pallas import (
    F32,
    GATE_COLS,
    ROW_BETA,
    ROW_G,
    ROW_SEG,
    Matmul,
    Problem,
    col_to_row,
    decay_mask,
    dot,
    dot_nt,
    dot_tn,
    mm_dtype,
    pad_axis,
    problem,
    row_to_col,
    weights,
)

# ----------------------------------------------------------------------------- layout


def chunk_length(chunk_size: int, time: int) -> int:
    """The kernels' chunk: ``chunk_size`` rounded up to a multiple of 8, never more than the
    time rounded up to one."""
    up = lambda x: -(-x // 8) * 8  # noqa: E731
    return min(up(chunk_size), up(time))


def make_problem(q, k, v, g, beta, resets, chunk_size: int) -> Problem:
    """The inputs in the TPU kernels' layout (:func:`~mnemax.kernels.chunked_pallas.problem` with
    ``L`` from :func:`chunk_length` and unpadded features). Padded steps change nothing."""
    return problem(q, k, v, g, beta, resets, chunk_length(chunk_size, q.shape[2]), q.shape[3], v.shape[3])


def matmuls(dtype) -> tuple[Matmul, Matmul]:
    """(the matmul policy for operands of ``dtype``, the float32 one): float32 operands at
    HIGHEST precision (Mosaic's fp32 contraction), 16-bit ones as they are."""
    return Matmul(mm_dtype(dtype), lax.Precision.HIGHEST), Matmul(F32, lax.Precision.HIGHEST)


def interpret_params(interpret: bool):
    """``interpret=`` of a TPU ``pallas_call``: the TPU interpreter (VMEM scratch, grid
    order and dimension semantics as on a TPU) or False."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams() if interpret else False


def chunk_specs(p: Problem, reverse: bool = False):
    """BlockSpecs of grid (BH, NC): cell (b, c) sees chunk c of row b (the last chunk
    first with ``reverse``)."""
    NC, L = p.n_chunks, p.L

    def c_of(c):
        return NC - 1 - c if reverse else c

    row = lambda d: pl.BlockSpec((None, L, d), lambda b, c: (b, c_of(c), 0))  # noqa: E731
    chunk = lambda *s: pl.BlockSpec((None, None, *s), lambda b, c: (b, c_of(c)) + (0,) * len(s))  # noqa: E731
    return {"k": row(p.d_k), "v": row(p.d_v), "gc": chunk(L, GATE_COLS), "gr": chunk(GATE_COLS, L),
            "S": chunk(p.d_k, p.d_v), "LL": chunk(L, L), "rows": chunk(GATE_COLS, L),
            "state": pl.BlockSpec((None, p.d_k, p.d_v), lambda b, c: (b, 0, 0))}


def gate_tiles(gc_r, gr_r, L):
    """The chunk's gate tiles (L, 8), (8, L) and its :class:`~mnemax.kernels.chunked_pallas.Weights`."""
    gc, gr = gc_r[...], gr_r[...]
    return gc, gr, weights(gc[:, ROW_G:ROW_G + 1], gc[:, ROW_SEG:ROW_SEG + 1], gc[:, ROW_BETA:ROW_BETA + 1], L)


def walk_params():
    """Mosaic's compiler parameters of the walks: rows "parallel", chunks "arbitrary" (in order)."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def parallel_params():
    """Mosaic's compiler parameters of a per-chunk kernel: rows and chunks "parallel"."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_r, k_r, x_r, wk_r, gc_r, gr_r, s0_r, o_r, sT_r, st_r, xo_r, S_s, *, L, scale, delta, mm):
    """One chunk: S_in saved, X = x [- Wk S_in], o = (scale q q_in) S_in + P X, S_out."""

    @pl.when(pl.program_id(1) == 0)
    def _():
        S_s[...] = s0_r[...]

    S = S_s[...]
    gc, gr, w = gate_tiles(gc_r, gr_r, L)
    if st_r is not None:
        st_r[...] = S.astype(st_r.dtype)
    X = x_r[...].astype(F32)
    if delta:
        X = X - dot(wk_r[...], S, mm)
        if xo_r is not None:
            xo_r[...] = X.astype(xo_r.dtype)
    q, k = q_r[...].astype(F32), k_r[...].astype(F32)
    P = dot_nt(q, k, mm) * (decay_mask(gc, gr, L, strict=False) * scale)
    o = dot(P, X, mm) + dot(q * (w.q_in * scale), S, mm)
    o_r[...] = o.astype(o_r.dtype)
    S = w.a * S + dot_tn(k * w.k_out, X, mm)
    S_s[...] = S
    sT_r[...] = S


def forward(p: Problem, x, xw, s0, out_dtype, *, scale: float, delta: bool, save: bool, interpret: bool):
    """The forward walk with the outputs. ``x``: V (linear attention) or U (delta rule),
    (BH, Tp, d_v); ``xw``: Wk (BH, Tp, d_k) for the delta rule, else None; ``s0`` (BH, d_k,
    d_v) float32. Returns (o (BH, Tp, d_v) in ``out_dtype``, the final state (BH, d_k, d_v)
    float32, and with ``save`` the incoming state of every chunk (BH, NC, d_k, d_v) and for
    the delta rule X (BH, Tp, d_v), both in the matmul dtype; else None, None)."""
    from jax.experimental.pallas import tpu as pltpu

    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp, dk, dv = NC * L, p.d_k, p.d_v
    mm, _ = matmuls(p.q.dtype)
    sp = chunk_specs(p)
    in_specs = [sp["k"], sp["k"], sp["v"]] + ([sp["k"]] if delta else []) + [sp["gc"], sp["gr"], sp["state"]]
    args = [p.q, p.k, x] + ([xw] if delta else []) + [p.gcol, p.grow, s0]
    out_specs = [sp["v"], sp["state"]]
    out_shape = [jax.ShapeDtypeStruct((BH, Tp, dv), out_dtype), jax.ShapeDtypeStruct((BH, dk, dv), F32)]
    if save:
        out_specs.append(sp["S"])
        out_shape.append(jax.ShapeDtypeStruct((BH, NC, dk, dv), mm.dtype))
        if delta:
            out_specs.append(sp["v"])
            out_shape.append(jax.ShapeDtypeStruct((BH, Tp, dv), mm.dtype))
    n_in, n_out = len(args), len(out_shape)

    def kernel(*refs):
        ins, outs, (S_s,) = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out:]
        q_r, k_r, x_r, *rest = ins
        wk_r = rest.pop(0) if delta else None
        gc_r, gr_r, s0_r = rest
        o_r, sT_r, *saved = outs
        saved += [None] * (2 - len(saved))
        _fwd_kernel(q_r, k_r, x_r, wk_r, gc_r, gr_r, s0_r, o_r, sT_r, saved[0], saved[1], S_s, L=L, scale=scale,
                    delta=delta, mm=mm)

    outs = pl.pallas_call(
        kernel, grid=(BH, NC), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, name="_tpu_fwd_kernel",
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=walk_params(), interpret=interpret_params(interpret),
    )(*args)
    o, S_T, *saved = outs
    saved += [None] * (2 - len(saved))
    return o, S_T, saved[0], saved[1]


# ----------------------------------------------------------------------------- backward


def _bwd_kernel(q_r, k_r, v_r, x_r, do_r, gc_r, gr_r, s_r, dsT_r, r_r, wk_r,
                dq_r, dk_r, dv_r, dg_r, ds0_r, dS_s, *, L, scale, delta, mm, f32):
    """One chunk of the adjoint walk (last chunk first) with its gradients: the per-chunk
    gradients of :func:`mnemax.kernels.chunked_gpu.chunk_grads` given S_in and dS_out, then
    ``dS_in = a dS_out + (scale q q_in)^T dO [- Wk^T dX]``."""

    @pl.when(pl.program_id(1) == 0)
    def _():
        dS_s[...] = dsT_r[...]

    dS = dS_s[...]
    gc, gr, w = gate_tiles(gc_r, gr_r, L)
    q, k = q_r[...].astype(F32), k_r[...].astype(F32)
    S, dO, X = s_r[...], do_r[...], x_r[...]
    D = decay_mask(gc, gr, L, strict=False)
    P = dot_nt(q, k, mm) * D * scale
    k_out = k * w.k_out
    qw = w.q_in * scale
    PtdO_kdS = dot_tn(P.astype(mm.dtype), dO, mm) + dot(k_out, dS, mm)  # dX (delta rule) or dv (linear attention)

    dP = dot_nt(dO, X, mm)
    dQ = dot_nt(dO, S, mm)
    dKo = dot_nt(X, dS, mm)
    gq = jnp.sum(q * dQ, axis=1, keepdims=True)
    gko = jnp.sum(k * dKo, axis=1, keepdims=True)
    ga = jnp.sum(jnp.sum(S.astype(F32) * dS, axis=1, keepdims=True), axis=0, keepdims=True)
    dq = dQ * qw
    dk = w.k_out * dKo
    new = w.a * dS + dot_tn(q * qw, dO, mm)
    if delta:
        dX = PtdO_kdS
        R = r_r[...]
        T = R * gr[ROW_BETA:ROW_BETA + 1, :]
        k_in = k * w.q_in
        E = v_r[...].astype(F32) - dot(k_in, S, mm)
        dT = dot_nt(dX, E, mm)
        dV = dot_tn(T, dX, f32)
        dKi = -dot_nt(dV, S, mm)
        dk = dk + w.q_in * dKi
        gki = jnp.sum(k * dKi, axis=1, keepdims=True)
        new = new - dot_tn(wk_r[...], dX, mm)
    else:
        dV = PtdO_kdS
    dS_s[...] = new
    ds0_r[...] = new

    dPm = dP * D * scale
    dq = dq + dot(dPm, k, mm)
    dk = dk + dot_tn(dPm, q, mm)
    gP = dP * P
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    gk_out = w.k_out * gko
    dG = (jnp.sum(gP, axis=1, keepdims=True) - row_to_col(jnp.sum(gP, axis=0, keepdims=True), L) + qw * gq - gk_out
          + jnp.where(last, jnp.sum(gk_out, axis=0, keepdims=True) + w.a * ga, 0.0))
    dbeta = jnp.zeros((L, 1), F32)
    if delta:
        dG = dG + w.q_in * gki
        beta_r = gr[ROW_BETA:ROW_BETA + 1, :]
        dbeta_row = jnp.sum(R * dT, axis=0, keepdims=True)
        dR = dT * beta_r
        Ds = decay_mask(gc, gr, L, strict=True)
        dN = -dot_nt(dot_tn(R, dR, f32), R, f32) * (Ds > 0.0)
        Kd = dot_nt(k, k, f32) * Ds
        dbeta = jnp.sum(dN * Kd, axis=1, keepdims=True) + row_to_col(dbeta_row, L)
        dKd = w.beta * dN
        M = dKd * Ds
        dk = dk + dot(M, k, f32) + dot_tn(M, k, f32)
        gK = dKd * Kd
        dG = dG + jnp.sum(gK, axis=1, keepdims=True) - row_to_col(jnp.sum(gK, axis=0, keepdims=True), L)
    dq_r[...] = dq.astype(dq_r.dtype)
    dk_r[...] = dk.astype(dk_r.dtype)
    dv_r[...] = dV.astype(dv_r.dtype)
    dg_r[...] = jnp.concatenate([col_to_row(dG, L), col_to_row(dbeta, L), jnp.zeros((GATE_COLS - 2, L), F32)],
                                axis=0)


def backward(p: Problem, x, do, states, dS_T, *, scale: float, delta: bool, R=None, xw=None, interpret: bool):
    """The adjoint walk with every chunk's gradients. ``x``: V (linear attention) or the
    saved delta errors X; ``do`` (BH, Tp, d_v) in the input dtype; ``states`` every chunk's
    incoming state (from :func:`forward`); ``dS_T`` (BH, d_k, d_v) float32; the delta rule
    also takes each chunk's ``R = (I + N)^-1`` and ``xw`` = Wk. Returns (dq, dk (BH, Tp,
    d_k), dv (BH, Tp, d_v) in the input dtype, rows (dG, dbeta) (BH, NC, 8, L) float32, the
    initial state's gradient (BH, d_k, d_v) float32)."""
    from jax.experimental.pallas import tpu as pltpu

    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp, dk, dv = NC * L, p.d_k, p.d_v
    mm, f32 = matmuls(p.q.dtype)
    sp = chunk_specs(p, reverse=True)
    in_specs = [sp["k"], sp["k"], sp["v"], sp["v"], sp["v"], sp["gc"], sp["gr"], sp["S"], sp["state"]]
    args = [p.q, p.k, p.v, x, do, p.gcol, p.grow, states, dS_T]
    if delta:
        in_specs += [sp["LL"], sp["k"]]
        args += [R, xw]
    n_in = len(args)
    dt = p.q.dtype

    def kernel(*refs):
        ins, outs = refs[:n_in], refs[n_in:]
        r_r, wk_r = ins[9:] if delta else (None, None)
        _bwd_kernel(*ins[:9], r_r, wk_r, *outs, L=L, scale=scale, delta=delta, mm=mm, f32=f32)

    return pl.pallas_call(
        kernel, grid=(BH, NC), in_specs=in_specs, name="_tpu_bwd_kernel",
        out_specs=[sp["k"], sp["k"], sp["v"], sp["rows"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct((BH, Tp, dk), dt), jax.ShapeDtypeStruct((BH, Tp, dk), dt),
                   jax.ShapeDtypeStruct((BH, Tp, dv), dt), jax.ShapeDtypeStruct((BH, NC, GATE_COLS, L), F32),
                   jax.ShapeDtypeStruct((BH, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=walk_params(), interpret=interpret_params(interpret),
    )(*args)


def pad_cotangent(p: Problem, do):
    """The output's cotangent (B, H, T, d_v) in the kernels' layout (BH, Tp, d_v), input dtype."""
    B, H, T, dv = do.shape
    return pad_axis(do.astype(p.q.dtype).reshape(B * H, T, dv), 1, p.n_chunks * p.L)

