"""Pallas GPU (Triton) kernels for ``delta_rule`` with one log decay per key channel (Kimi
Delta Attention, KDA; fla's ``chunk_kda``): the per-channel scores of
:mod:`mnemax.kernels.gated_linear_attention.gpu` (transposed states, intra-chunk terms factored
or sub-chunked, key blocks) with the WY/UT representation of :mod:`mnemax.kernels.delta_rule.gpu`.

With ``G`` (L, d_k) the cumulative log decay since the chunk's start (per channel; resets
cut the chunk into segments), ``[fresh]`` the steps the incoming state reaches, ``[last]``
the chunk's last segment and ``[carries]`` a chunk without a reset (as in the GLA module),
per chunk (see :mod:`mnemax.kernels.delta_rule.xla` for the algebra; ``X`` here is its
``W`` times ``beta``)::

    K_ts   = sum_d k_td k_sd exp(G_td - G_sd)                    s < t, one segment
    N      = Diag(beta) K,   R = (I + N)^-1,   T = R Diag(beta)  unit lower triangular R
    U      = T V,   Wk = T (k * exp(G) [fresh]),   X = U - Wk S_in
    A_ts   = scale sum_d q_td k_sd exp(G_td - G_sd)              s <= t, one segment
    o      = (scale q * exp(G) [fresh]) S_in + A X
    S_out  = Diag(exp(G_L) [carries]) S_in + (k * exp(G_L - G) [last])^T X

``K`` and ``A`` come from :func:`~mnemax.kernels.gated_linear_attention.gpu.intra` (factored
where the chunk's decay spans at most ``ChunkedConfig.span_limit`` nats, else with every
exponent <= 0); ``R`` in float32: where the chunk's decay spans at most the limit
over every key channel, by block forward substitution over row blocks of
``ChunkedConfig.wy_rows`` (32 steps by default;
:func:`~mnemax.kernels.delta_rule.gpu.block_inverse`, each block of ``K`` a factored
product), else by the doubling product over the whole chunk
(:func:`~mnemax.kernels.delta_rule.common.unit_lower_inverse`). The forward: ``G`` and
``k_out = k exp(G_L - G) [last]`` in one pass
(:func:`~mnemax.kernels.gated_linear_attention.gpu.chunk_decays`), :func:`wy` (R, U and Wk
for every chunk), the state walk (:func:`walk_forward`: saves S_in and X), then GLA's
per-chunk outputs with ``X`` for the values. The backward: ``G``, ``k_out`` and ``q_in = scale
q exp(G) [fresh]`` in one pass, ``A^T dO`` (:func:`scores_t_times`), then with ``dX = A^T dO +
k_out dS_out`` the adjoint walk (:func:`walk_backward`)::

    dS_in  = Diag(exp(G_L) [carries]) dS_out + (scale q * exp(G) [fresh])^T dO - Wk^T dX

then per chunk GLA's gradients of ``o`` and ``S_out`` with ``X`` for ``V`` (dq, the A and
k_out parts of dk and dG) and, from :func:`delta_grads`, those through ``X = T (V - k_in
S_in)`` with ``k_in = k * exp(G) [fresh]``::

    Y      = dX S_in^T,   dT = dX V^T - Y k_in^T,   dv = T^T dX,   dk_in = -T^T Y
    dR     = dT Diag(beta),   dN = -(R^T dR R^T) [s < t, one segment]
    dbeta  = colsum(R (.) dT) + rowsum(dN (.) K),   dK = Diag(beta) dN
    dK^q_u = sum_{s<u} dK_us k_s (.) exp(G_u - G_s),   dK^k_u = sum_{t>u} dK_tu k_t (.) exp(G_t - G_u)
    dk     = exp(G) [fresh] (.) dk_in + dK^q + dK^k
    dG     = k_in (.) dk_in + k (.) (dK^q - dK^k)

(``dK^q`` and ``dK^k`` are ``intra``'s q- and k-side gradients with ``q = k``), both added
to GLA's dk and dG; ``dg`` is the reverse cumulative sum of the summed ``dG`` inside each
chunk.

The walks read ``k_out`` and ``q_in`` in the matmul dtype, formed once per chunk where ``G``
is made, rather than ``k``, ``q`` and the float32 ``G`` in every value tile of the state: on
Hopper (Triton 3.9 for sm_90, compiled on the CPU) that takes the forward walk from 90 to 56
KiB of shared memory and 141 to 99 registers, the adjoint walk from 122 to 72 KiB (one program
per SM to three) and 214 to 137 registers, and on an H100 at (2, 8192, 16, 128) the walks from
0.92 / 1.90 ms to 0.47 / 0.56 (forward / adjoint); the products round them to the matmul dtype
either way, so the values are the same. Written by the WY and ``A^T dO`` kernels, they cost
those kernels 0.10 and 0.18 ms at (8, 2048); the pass that makes ``G`` streams them instead.

Layouts: those of the GLA module (states (BH, NC, d_v, d_k) transposed, ``G`` (BH, Tp, d_k)
float32, the gate columns carrying the segments and ``beta`` with ``G = 0``); ``R`` (BH, NC,
L, L) and ``U`` float32, ``Wk`` and ``X`` in the matmul dtype, as the per-head delta rule
keeps them. Matmul operands follow :func:`~mnemax.kernels.chunked_gpu.matmuls`; ``K``, the
inverse and its gradient run at the float32 policy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..chunked import decay_span, mid_range
from ..chunked_gpu import ChunkedConfig, compiler_params, matmuls
from ..chunked_pallas import (
    F32,
    GATE_COLS,
    ROW_BETA,
    ROW_SEG,
    Problem,
    chunk_weights,
    col_to_row,
    decay_grad,
    dot,
    dot_nt,
    dot_tn,
    mm_dtype,
    pad_axis,
    seq_out,
    state_in_t,
    state_out_t,
    step_out,
)
from ..gated_linear_attention import gpu as gla
from .common import unit_lower_inverse
from .gpu import block_inverse, write_blocks


def _blocks(p: Problem, config: ChunkedConfig, span: float):
    """The per-chunk kernels' static loop sizes (key blocks and value blocks) and scores' form
    (``span``, :func:`~mnemax.kernels.gated_linear_attention.gpu.intra`, from
    :func:`~mnemax.kernels.gated_linear_attention.gpu.by_span`)."""
    bv, bk = config.value_block(p.d_v), gla.key_block(p.d_k)
    return dict(nk=p.d_k // bk, bk=bk, nv=p.d_v // bv, bv=bv, span=span)


def _strict(gc_r, gr_r, L: int):
    """(L, L) ``s < t`` in one segment."""
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    return (col < row) & (gc_r[:, ROW_SEG:ROW_SEG + 1] == gr_r[ROW_SEG:ROW_SEG + 1, :])


def _key_scores(k_r, G_r, gc_r, gr_r, L: int, nk: int, bk: int, span: float, f32):
    """The chunk's unscaled key-key scores ``K`` (L, L) float32 for s <= t (the diagonal
    included), by key blocks."""

    def block(i, K):
        return K + gla.intra(k_r, k_r, G_r, gc_r, gr_r, pl.ds(pl.multiple_of(i * bk, bk), bk), L, f32, f32, span=span)

    return lax.fori_loop(0, nk, block, jnp.zeros((L, L), F32))


# ----------------------------------------------------------------------------- kernels


def _wy_whole(k_r, v_r, G_r, gc_r, gr_r, r_r, u_r, wk_r, *, L, nk, bk, nv, bv, span, f32):
    """One chunk's R, U and Wk for any decay: ``K`` from :func:`_key_scores`, ``R`` by the
    doubling product over the whole chunk."""
    w = chunk_weights(gc_r, L)
    N = jnp.where(_strict(gc_r, gr_r, L), _key_scores(k_r, G_r, gc_r, gr_r, L, nk, bk, span, f32), 0.0) * w.beta
    R = unit_lower_inverse(N, L, f32)
    r_r[...] = R
    T = R * gr_r[ROW_BETA:ROW_BETA + 1, :]

    def keys(i, carry):
        kc = pl.ds(pl.multiple_of(i * bk, bk), bk)
        wk_r[:, kc] = dot(T, k_r[:, kc].astype(F32) * (w.q_in * jnp.exp(G_r[:, kc])), f32).astype(wk_r.dtype)
        return carry

    def values(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        u_r[:, vc] = dot(T, v_r[:, vc].astype(F32), f32)
        return carry

    lax.fori_loop(0, nk, keys, 0)
    lax.fori_loop(0, nv, values, 0)


def _wy_blocked(k_r, v_r, G_r, gc_r, gr_r, r_r, u_r, wk_r, *, L, b, nk, bk, nv, bv, f32):
    """One chunk's R, U and Wk in row blocks of ``b`` steps, for a decay spanning at most the
    span limit over the whole chunk: block (i, j) of ``N`` is the factored product ``(k_i
    exp(G_i - c)) (k_j exp(c - G_j))^T`` (masked, times beta), ``c`` the middle of each
    channel's range of ``G``, summed over key blocks (a loop, so that the factors of only one
    key block are live), and ``R`` comes by block forward substitution
    (:func:`~mnemax.kernels.delta_rule.gpu.block_inverse`); ``Wk_i = sum_j T_ij (k_j exp(G_j)
    [fresh])`` and ``U_i = sum_j T_ij V_j``."""
    nb = L // b
    rows = [slice(i * b, (i + 1) * b) for i in range(nb)]
    pairs = [(i, j) for i in range(nb) for j in range(i + 1)]

    def key_block(ik, acc):
        kc = pl.ds(pl.multiple_of(ik * bk, bk), bk)
        centre = mid_range(G_r[:, kc])
        P = [k_r[r, kc].astype(F32) * jnp.exp(G_r[r, kc] - centre) for r in rows]
        M = [k_r[r, kc].astype(F32) * jnp.exp(centre - G_r[r, kc]) for r in rows]
        return tuple(a + dot_nt(P[i], M[j], f32) for a, (i, j) in zip(acc, pairs))

    K = dict(zip(pairs, lax.fori_loop(0, nk, key_block, tuple(jnp.zeros((b, b), F32) for _ in pairs))))

    def n_block(i, j):
        mask = gc_r[rows[i], ROW_SEG:ROW_SEG + 1] == gr_r[ROW_SEG:ROW_SEG + 1, rows[j]]
        if i == j:
            mask = mask & (lax.broadcasted_iota(jnp.int32, (b, b), 1) < lax.broadcasted_iota(jnp.int32, (b, b), 0))
        return jnp.where(mask, K[i, j], 0.0) * gc_r[rows[i], ROW_BETA:ROW_BETA + 1]

    R = block_inverse(n_block, nb, b, f32)
    write_blocks(r_r, R, nb, b)
    T = {(i, j): R[i, j] * gr_r[ROW_BETA:ROW_BETA + 1, rows[j]] for i in range(nb) for j in range(i + 1)}

    def k_in(j):  # formed per use: a list of them would hold 64 more registers per thread
        r = rows[j]
        return k_r[r, :].astype(F32) * jnp.where(gc_r[r, ROW_SEG:ROW_SEG + 1] == 0.0, jnp.exp(G_r[r, :]), 0.0)

    for i in range(nb):
        acc = dot(T[i, 0], k_in(0), f32)
        for j in range(1, i + 1):
            acc = acc + dot(T[i, j], k_in(j), f32)
        wk_r[rows[i], :] = acc.astype(wk_r.dtype)

    def values(c, carry):
        vc = pl.ds(pl.multiple_of(c * bv, bv), bv)
        vs = [v_r[r, vc].astype(F32) for r in rows]
        for i in range(nb):
            acc = dot(T[i, 0], vs[0], f32)
            for j in range(1, i + 1):
                acc = acc + dot(T[i, j], vs[j], f32)
            u_r[rows[i], vc] = acc
        return carry

    lax.fori_loop(0, nv, values, 0)


def _wy_kernel(*refs, L, b, nk, bk, nv, bv, span, f32):
    """One chunk's R, U and Wk: :func:`_wy_blocked` where the chunk's decay spans at most
    ``span`` nats over every key channel (and ``b < L``), else :func:`_wy_whole`; ``span``
    :data:`~mnemax.kernels.gated_linear_attention.gpu.FACTORED`: every chunk is (the caller
    checked), no in-kernel test."""
    G_r = refs[2]
    whole = functools.partial(_wy_whole, *refs, L=L, nk=nk, bk=bk, nv=nv, bv=bv, span=span, f32=f32)
    if span <= 0 or b >= L:
        return whole()
    blocked = functools.partial(_wy_blocked, *refs, L=L, b=b, nk=nk, bk=bk, nv=nv, bv=bv, f32=f32)
    if span == gla.FACTORED:
        return blocked()
    lax.cond(decay_span(G_r[...]) <= span, blocked, whole)


def wy(p: Problem, G, *, config: ChunkedConfig, interpret: bool, span: float):
    """(R (BH, NC, L, L), U (BH, Tp, d_v), Wk (BH, Tp, d_k)) for every chunk: R and U
    float32, Wk in the matmul dtype (each of its products rounds it there); ``span`` as
    :func:`_blocks`."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp = NC * L
    sp = gla.chunk_specs(p)
    LL = pl.BlockSpec((None, None, L, L), lambda b, c: (b, c, 0, 0))
    return pl.pallas_call(
        functools.partial(_wy_kernel, L=L, b=config.wy_rows(L, channel=True), f32=matmuls(p.q.dtype, interpret, config)[1],
                          **_blocks(p, config, span)),
        grid=(BH, NC), in_specs=[sp["k"], sp["v"], sp["k"], sp["gc"], sp["gr"]],
        out_specs=[LL, sp["v"], sp["k"]],
        out_shape=[jax.ShapeDtypeStruct((BH, NC, L, L), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_k), mm_dtype(p.q.dtype))],
        compiler_params=compiler_params(interpret, config.num_warps, config.num_stages), interpret=interpret,
    )(p.k, p.v, G, p.gcol, p.grow)


def _walk_kernel(u_r, ko_r, wk_r, G_r, gc_r, s0_r, st_r, x_r, sT_r, *, L, NC, mm):
    """Per chunk: save S_in; X = U - Wk S_in (saved); S = Diag(exp(G_L) [carries]) S + X^T k_out
    (transposed; ``k_out`` from :func:`~mnemax.kernels.gated_linear_attention.gpu.chunk_decays`)."""

    def body(c, S):
        st_r[c] = S.astype(st_r.dtype)
        t = pl.ds(pl.multiple_of(c * L, L), L)
        X = u_r[t, :] - dot_nt(wk_r[t, :], S, mm)
        x_r[t, :] = X.astype(x_r.dtype)
        return gla.carry_decay(G_r, gc_r, c, L) * S + dot_tn(X, ko_r[t, :], mm)

    sT_r[...] = lax.fori_loop(0, NC, body, s0_r[...])


def walk_forward(p: Problem, G, U, Wk, k_out, s0, *, config: ChunkedConfig, interpret: bool):
    """The forward state walk from ``s0`` (BH, d_v, d_k) (transposed, float32). Returns (the
    incoming state of every chunk (BH, NC, d_v, d_k) and X (BH, Tp, d_v), both in the matmul
    dtype, the final state (BH, d_v, d_k) float32)."""
    return gla.walk(_walk_kernel, p, ("values", "keys", "keys", "keys", "gates", "tile"), (U, k_out, Wk, G, p.gcol, s0),
                    values_out=True, config=config, interpret=interpret)


def _walk_back_kernel(qi_r, ko_r, do_r, wk_r, x0_r, G_r, gc_r, ds_r, dst_r, dx_r, ds0_r, *, L, NC, mm):
    """The adjoint walk (see :func:`walk_backward`)."""

    def body(j, dS):
        c = NC - 1 - j
        dst_r[c] = dS.astype(dst_r.dtype)
        t = pl.ds(pl.multiple_of(c * L, L), L)
        dX = x0_r[t, :] + dot_nt(ko_r[t, :], dS, mm)
        dx_r[t, :] = dX
        return gla.carry_decay(G_r, gc_r, c, L) * dS + dot_tn(do_r[t, :], qi_r[t, :], mm) - dot_tn(dX, wk_r[t, :], mm)

    ds0_r[...] = lax.fori_loop(0, NC, body, ds_r[...])


def walk_backward(p: Problem, G, do, Wk, x0, q_in, k_out, dS_T, *, config: ChunkedConfig, interpret: bool):
    """The adjoint walk from the last chunk, transposed: ``dX = x0 + k_out dS_out`` (``x0`` =
    A^T dO) and ``dS_in = Diag(exp(G_L) [carries]) dS_out + q_in^T dO - Wk^T dX`` (``q_in =
    scale q exp(G) [fresh]`` and ``k_out`` from
    :func:`~mnemax.kernels.gated_linear_attention.gpu.chunk_decays`). Returns (every
    chunk's outgoing-state gradient (BH, NC, d_v, d_k) in the matmul dtype, dX (BH, Tp, d_v)
    float32, the initial state's gradient (BH, d_v, d_k) float32)."""
    return gla.walk(_walk_back_kernel, p, ("keys", "keys", "values", "keys", "values", "keys", "gates", "tile"),
                    (q_in, k_out, do, Wk, x0, G, p.gcol, dS_T), values_out=True, values_dtype=F32, config=config,
                    interpret=interpret)


def _scores_t_kernel(q_r, k_r, do_r, G_r, gc_r, gr_r, o_r, *, L, nk, bk, nv, bv, span, scale, mm, f32):
    """One chunk's A^T dO."""

    def scores(i, A):
        return A + gla.intra(q_r, k_r, G_r, gc_r, gr_r, pl.ds(pl.multiple_of(i * bk, bk), bk), L, mm, f32, span=span)

    A = (lax.fori_loop(0, nk, scores, jnp.zeros((L, L), F32)) * scale).astype(mm.dtype)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        o_r[:, vc] = dot_tn(A, do_r[:, vc], mm)
        return carry

    lax.fori_loop(0, nv, block, 0)


def scores_t_times(p: Problem, G, do, *, scale: float, config: ChunkedConfig, interpret: bool, span: float):
    """A^T dO (BH, Tp, d_v) float32 for every chunk, the adjoint walk's ``x0``; ``span`` as
    :func:`_blocks`."""
    BH, NC = p.q.shape[0], p.n_chunks
    Tp = NC * p.L
    sp = gla.chunk_specs(p)
    mm, f32 = matmuls(p.q.dtype, interpret, config)
    return pl.pallas_call(
        functools.partial(_scores_t_kernel, L=p.L, scale=scale, mm=mm, f32=f32, **_blocks(p, config, span)),
        grid=(BH, NC), in_specs=[sp["k"], sp["k"], sp["v"], sp["k"], sp["gc"], sp["gr"]],
        out_specs=sp["v"], out_shape=jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32),
        compiler_params=compiler_params(interpret, config.num_warps, config.num_stages), interpret=interpret,
    )(p.q, p.k, do, G, p.gcol, p.grow)


def _delta_grads_kernel(k_r, v_r, G_r, gc_r, gr_r, s_r, r_r, dx_r, dk_r, dv_r, dg_r, db_r, *, L, nk, bk, nv, bv,
                        span, mm, f32):
    """One chunk's gradients through X = T (V - k_in S_in); see :func:`delta_grads`."""
    w = chunk_weights(gc_r, L)
    R = r_r[...]
    beta_row = gr_r[ROW_BETA:ROW_BETA + 1, :]
    T = R * beta_row

    def fresh(kc):  # k_in's factor exp(G) [fresh], key columns kc (L, kc)
        return w.q_in * jnp.exp(G_r[:, kc])

    def dx_s(kc):  # Y = dX S_in^T, key columns kc (L, kc)
        def block(j, Y):
            vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
            return Y + dot(dx_r[:, vc], s_r[vc, kc], mm)

        return lax.fori_loop(0, nv, block, jnp.zeros((L, bk), F32))

    def values(j, dT):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        dX = dx_r[:, vc]
        dv_r[:, vc] = dot_tn(T, dX, f32)
        return dT + dot_nt(dX, v_r[:, vc], mm)

    def keys_dT(i, dT):
        kc = pl.ds(pl.multiple_of(i * bk, bk), bk)
        return dT - dot_nt(dx_s(kc), k_r[:, kc].astype(F32) * fresh(kc), mm)

    dT = lax.fori_loop(0, nk, keys_dT, lax.fori_loop(0, nv, values, jnp.zeros((L, L), F32)))
    dN = jnp.where(_strict(gc_r, gr_r, L), -dot_nt(dot_tn(R, dT * beta_row, f32), R, f32), 0.0)
    dK = dN * w.beta

    def keys(i, K):
        kc = pl.ds(pl.multiple_of(i * bk, bk), bk)
        z = jnp.zeros((L, bk), F32)
        K_k, dKq, dKk = gla.intra(k_r, k_r, G_r, gc_r, gr_r, kc, L, f32, f32, dA=dK, acc=(z, z), span=span)
        dk_in = -dot_tn(T, dx_s(kc), f32) * fresh(kc)  # through k_in
        dk_r[:, kc] = dKq + dKk + dk_in
        dg_r[:, kc] = k_r[:, kc].astype(F32) * (dKq - dKk + dk_in)
        return K + K_k

    K = lax.fori_loop(0, nk, keys, jnp.zeros((L, L), F32))
    db_r[0:1, :] = jnp.sum(R * dT, axis=0, keepdims=True) + col_to_row(jnp.sum(dN * K, axis=1, keepdims=True), L)


def delta_grads(p: Problem, G, states, R, dX, *, config: ChunkedConfig, interpret: bool, span: float):
    """The gradients through every chunk's ``X = T (V - k_in S_in)`` (see the module
    docstring), given its incoming state ``states`` (transposed), ``R`` and ``dX`` = dL/dX
    from the adjoint walk: (dk (BH, Tp, d_k), dv (BH, Tp, d_v), dG (BH, Tp, d_k), rows (BH,
    NC, 8, L) whose row 0 is dbeta), float32; dk and dG are to be added to the GLA parts.
    ``span`` as :func:`_blocks`."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp = NC * L
    sp = gla.chunk_specs(p)
    chunk = lambda *s: pl.BlockSpec((None, None, *s), lambda b, c: (b, c) + (0,) * len(s))  # noqa: E731
    mm, f32 = matmuls(p.q.dtype, interpret, config)
    return pl.pallas_call(
        functools.partial(_delta_grads_kernel, L=L, mm=mm, f32=f32, **_blocks(p, config, span)),
        grid=(BH, NC), in_specs=[sp["k"], sp["v"], sp["k"], sp["gc"], sp["gr"], sp["S"], chunk(L, L), sp["v"]],
        out_specs=[sp["k"], sp["v"], sp["k"], chunk(GATE_COLS, L)],
        out_shape=[jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32), jax.ShapeDtypeStruct((BH, NC, GATE_COLS, L), F32)],
        compiler_params=compiler_params(interpret, config.bwd_warps, config.num_stages), interpret=interpret,
    )(p.k, p.v, G, p.gcol, p.grow, states, R, dX)


# ----------------------------------------------------------------------------- the op


def forward(q, k, v, beta, g, state, cut, *, chunk_size: int, scale: float, config: ChunkedConfig,
            interpret: bool):
    """(o (B, H, T, d_v) in q's dtype, the final state (B, H, d_k, d_v) float32, the
    backward's residuals (every chunk's incoming state, X, R, Wk)) for per-channel ``g`` (B,
    H, T, d_k); ``cut``: the resets as float32 or None."""
    p, G, fits, (k_out,) = gla.channel_problem(q, k, v, g, cut, chunk_size, beta, config=config, interpret=interpret,
                                               decayed=1)
    s0 = state_in_t(p, state)

    def run(span):  # one lax.cond around the chunk kernels and the walk between them (gla.by_span)
        R, U, Wk = wy(p, G, config=config, interpret=interpret, span=span)
        states, X, S_T = walk_forward(p, G, U, Wk, k_out, s0, config=config, interpret=interpret)
        o = gla.outputs(p._replace(v=X), G, states, q.dtype, scale=scale, config=config, interpret=interpret, span=span)
        return o, S_T, (states, X, R, Wk)

    o, S_T, saved = gla.by_span(fits, config, run)
    return seq_out(o, v.shape), state_out_t(S_T, state.shape), saved


def backward(q, k, v, beta, g, state, cut, saved, do, dfinal, *, chunk_size: int, scale: float,
             config: ChunkedConfig, interpret: bool):
    """The cotangents (dq, dk, dv, dbeta, dg, dstate) of :func:`forward`'s (o, final state),
    in the inputs' shapes and dtypes; ``saved``: :func:`forward`'s residuals."""
    states, X, R, Wk = saved
    p, G, fits, (k_out, q_in) = gla.channel_problem(q, k, v, g, cut, chunk_size, beta, config=config,
                                                    interpret=interpret, decayed=2, scale=scale)
    B, H, T, _ = q.shape
    do = pad_axis(pad_axis(do.astype(q.dtype).reshape(B * H, T, -1), 1, p.n_chunks * p.L), 2, p.d_v)
    kw = dict(config=config, interpret=interpret)
    dS_T = state_in_t(p, dfinal)

    def run(span):  # one lax.cond around the chunk kernels and the adjoint walk (gla.by_span)
        x0 = scores_t_times(p, G, do, scale=scale, span=span, **kw)
        dstates, dX, dS0 = walk_backward(p, G, do, Wk, x0, q_in, k_out, dS_T, **kw)
        dq, dk_o, _, dG_o = gla.chunk_grads(p._replace(v=X), G, k_out, do, states, dstates, scale=scale, span=span,
                                             **kw)
        return (dq, dk_o, dG_o, dS0) + delta_grads(p, G, states, R, dX, span=span, **kw)

    dq, dk_o, dG_o, dS0, dk_x, dv, dG_x, rows = gla.by_span(fits, config, run)
    dg = decay_grad((dG_o + dG_x).reshape(B * H, p.n_chunks, p.L, p.d_k)).reshape(dG_o.shape)
    return (seq_out(dq, q.shape).astype(q.dtype), seq_out(dk_o + dk_x, k.shape).astype(k.dtype),
            seq_out(dv, v.shape).astype(v.dtype), step_out(rows[:, :, 0], beta.shape).astype(beta.dtype),
            seq_out(dg, g.shape).astype(g.dtype), state_out_t(dS0, state.shape).astype(state.dtype))
