"""Pallas GPU (Triton) kernels for ``mlstm``: the chunk-parallel forward and backward.

The chunk math (gate packing, the per-chunk weights, outputs and adjoint) is
:mod:`mnemax.kernels.mlstm.common`'s, shared with the TPU kernels. The kernels' tuning is
an :class:`~mnemax.kernels.mlstm.common.MLSTMConfig`, a static argument of every function
here.

The GPU path splits the chunkwise form into what is sequential and what is not:

1. gate scalars (XLA, O(time)): each chunk's incoming stabiliser m_in follows the
   max-plus recurrence m_end = max(m_in + b_end [no reset in the chunk], m_loc), run as an
   associative scan over chunks; from it the chunk-end weights w_a and c_s
   (:func:`chunk_scalars`);
2. the state walk (Pallas, sequential over chunks, parallel over (row, d_qk tile, d_v
   tile)): C_end = w_a C_in + (c * K)^T V, n_end = w_a n_in + (c * K)^T 1, saving every
   chunk's incoming state (in the matmul dtype; float32 carry);
3. the outputs (Pallas, one program per (row, chunk), all in parallel): the scores once,
   then a loop over the value blocks for the intra-chunk matmuls plus the incoming state's
   term; per-step stabiliser m_t, denominator sum den_t, carried-state weight w_t and
   arg-max flag are kept for the backward.

The backward is the same in reverse: the adjoint walk dC_in = w_a dC_end + (e * Q)^T dH,
e_t = s w_t / denom_t (and dn with s w_t dden_t) saves each chunk's end-state gradient;
the stabiliser's gradient (an eps-sized term along each m_t's arg-max) is a scalar affine
recurrence over chunks (XLA associative scan, :func:`adjoint`); then one program per (row,
key block of ``block_k``, chunk) writes dq, dk and its share of the gate gradients,
looping over the value blocks (:func:`gpu_dqk`; it takes each step's denominator and its
gradient from the forward's statistics and computes the chunk's scores after the loop, so
no L x L or L x d_qk value is live beside the loop's accumulators), and dv is written by a
per-(row, chunk) loop kernel (:func:`gpu_dv`) or, with one key block, inside the dq/dk
program's loop (``MLSTMConfig.dv``).

Blocks: per-chunk programs (row, chunk): (L, d_qk) / (L, d_v) with a loop over ``d_v /
block_v`` value blocks; state walk (row, d_qk tile, d_v tile): whole sequence, (L, tile)
per step; gates (L, 8) and (8, L) per chunk; walk carry (tile, tile) / (1, tile), saved
per chunk in the matmul dtype. ``L`` is ``chunk_size`` rounded up to a power of two >= 16
(never more than the padded length); ``d_qk, d_v`` are zero-padded to powers of two >= 16
(Triton's ``tl.dot``; on Hopper it lowers to wgmma); float32 matmuls use IEEE precision
(no TF32).

Defaults (``MLSTMConfig()``): the fastest measured on an H100 at d_qk 256 / d_v 512
(benchmarks/RESULTS.md): two key blocks of 128 and dv in the loop kernel (one key block of
256 held two 64 x 256 float32 accumulators per program; with the scores after the loop it
is still 1.5 ms slower at 64k), the dq/dk kernel on 8 warps and 3 stages (8 warps halve
each thread's share of the loop's three float32 accumulators: 10.5 -> 5.0 ms at 64k, 4.3
ms with 3 stages), the others on 4 warps and 2 stages (Triton software pipelining of the
per-chunk loops: 4-5% faster).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..dispatch import gpu_sm_count
from .common import (
    F32,
    GATE_ROWS,
    NEG_INF,
    MLSTMConfig,
    Problem,
    chunk_weights,
    col_to_row,
    dot,
    dot_nt,
    dot_tn,
    gates_from_refs,
    mm_dtype,
    row_to_col,
    scores,
)

COEF_COLS = 4  # state-walk coefficients per step: key/query weight, w_a (chunk), n weight, 0
STAT_ROWS = 4  # per-step forward statistics kept for the backward: m_t, den_t, w_t, carry wins
SMEM_BYTES = 232448  # the most shared memory one Hopper (sm_90) block may ask for
# What a per-chunk kernel holds in shared memory besides its pipelined loop's tiles. The
# float32 dq/dk kernel at d_qk 256 / d_v 512 asked for 344,064 B on an H100: 2 stages of
# 163,840 B (dqk_stage_bytes) plus 16 KB; this keeps 4x that for the layout conversions.
SMEM_RESERVE = 64 * 1024


def value_blocks(d_qk: int, d_v: int, config: MLSTMConfig) -> int:
    """How many value blocks split one row's (padded, power-of-two) ``d_v`` columns."""
    bv = config.block_v or max(16, 16384 // d_qk)
    return max(1, d_v // min(d_v, 1 << (max(16, bv).bit_length() - 1)))


def walk_tiles(rows: int, d_qk: int, d_v: int, config: MLSTMConfig) -> tuple[int, int]:
    """The state walk's (tile, warps): the config's ``state_block`` / ``state_warps``, or
    when unset 128 on 8 warps if ``rows`` (batch x heads) x its tiles fill every SM, else 64
    on 4 warps (each walk program is sequential over the chunks, so idle SMs are lost)."""
    sb, warps = config.state_block, config.state_warps
    if sb is None:
        tiles = rows * -(-d_qk // 128) * -(-d_v // 128)
        sb = 128 if tiles >= gpu_sm_count() else 64
    if warps is None:
        warps = 8 if sb >= 128 else 4
    return sb, warps


def pipeline_stages(stage_bytes: int, stages: int) -> int:
    """``stages`` (Triton's software pipelining keeps that many copies of a loop
    iteration's loads in shared memory), lowered until the copies of ``stage_bytes`` fit
    in ``SMEM_BYTES`` beside ``SMEM_RESERVE``; at least 1."""
    fit = (SMEM_BYTES - SMEM_RESERVE) // max(1, int(stage_bytes))
    return max(1, min(int(stages), fit))


def dqk_loop_bytes(L, bk, bv, v_size, dh_size, state_size) -> int:
    """The dq/dk loop's loads per value block: v and dh (L x bv), C and dC (bk x bv)."""
    return L * bv * (v_size + dh_size) + 2 * bk * bv * state_size


def dqk_stage_bytes(p: Problem, dh_dtype, state_dtype, config: MLSTMConfig) -> int:
    """One iteration of the dq/dk kernel's value loop: v and dh (L x bv), C and dC (bk x bv)."""
    _, bk, _, bv = split_layout(p, config)
    isz = lambda d: jnp.dtype(d).itemsize  # noqa: E731
    return dqk_loop_bytes(p.L, bk, bv, isz(p.v.dtype), isz(dh_dtype), isz(state_dtype))


def _compiler_params(interpret, warps, stages, stage_bytes=None):
    """Triton's compiler parameters (None in interpret mode); ``stages`` lowered to fit
    ``stage_bytes`` per pipeline copy (:func:`pipeline_stages`)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=warps,
                                   num_stages=stages if stage_bytes is None else pipeline_stages(stage_bytes, stages))


def chunk_scalars(p: Problem, m0):
    """Gate-only chunk quantities (see the module docstring): ``m_in`` (BH, NC) each
    chunk's incoming stabiliser, ``m_T`` (BH,) the final one, ``w_a`` (BH, NC) the incoming
    state's weight in the chunk-end state and ``c`` (BH, NC, L) each key's (0 at padding
    and before the chunk's last reset). ``m0``: (BH,)."""
    gi, b, r, ok, g = (p.grow[:, :, j, :] for j in range(5))
    b_end, r_end = b[..., -1], r[..., -1]
    live = (r == r_end[..., None]) & (ok > 0)
    m_loc = jnp.max(jnp.where(live, b_end[..., None] - b + g, NEG_INF), axis=-1)
    G = jnp.where(r_end == 0, b_end, NEG_INF)  # a reset inside the chunk cuts the carry

    def compose(e1, e2):  # x -> max(x + G, M), applied e1 then e2
        return e1[0] + e2[0], jnp.maximum(e1[1] + e2[0], e2[1])

    Gc, Mc = lax.associative_scan(compose, (G, m_loc), axis=1)
    m_end = jnp.maximum(m0[:, None] + Gc, Mc)
    m_in = jnp.concatenate([m0[:, None], m_end[:, :-1]], axis=1)
    w_a = jnp.exp(jnp.where(r_end == 0, b_end + m_in, NEG_INF) - m_end)
    c = jnp.exp(jnp.where(live, b_end[..., None] - b + gi, NEG_INF) - m_end[..., None])
    return m_in, m_end[:, -1], w_a, c


def coefs(w_a, x_weight, n_weight):
    """(BH, NC, L, COEF_COLS) state-walk coefficients."""
    return jnp.stack([x_weight, jnp.broadcast_to(w_a[..., None], x_weight.shape), n_weight, jnp.zeros_like(x_weight)],
                     axis=-1)


def _gpu_walk_kernel(x_r, y_r, co_r, s0_r, n0_r, st_r, nst_r, sT_r, nT_r, *, L, NC, reverse, mm):
    """S <- w_a S + (x * coef)^T y and n <- w_a n + (x * ncoef)^T 1 over the chunks (last to
    first with ``reverse``), saving the state before each chunk's update."""

    def body(j, carry):
        S, n = carry
        c = NC - 1 - j if reverse else j
        st_r[c] = S.astype(st_r.dtype)
        nst_r[c] = n
        t = pl.ds(pl.multiple_of(c * L, L), L)
        a = co_r[c, 0:1, 1:2]
        x = x_r[t, :].astype(F32)
        S = a * S + dot_tn(x * co_r[c, :, 0:1], y_r[t, :], mm)
        n = a * n + jnp.sum(x * co_r[c, :, 2:3], axis=0, keepdims=True)
        return S, n

    S, n = lax.fori_loop(0, NC, body, (s0_r[...], n0_r[...]))
    sT_r[...], nT_r[...] = S, n


def walk(p: Problem, x, y, coefs, s0, n0, *, reverse, state_dtype, config: MLSTMConfig, interpret):
    """The state walk over all rows: returns (states (BH, NC, d_qk, d_v) before each chunk's
    update in walk order, n states (BH, NC, 1, d_qk), final S (BH, d_qk, d_v), final n (BH, 1,
    d_qk))."""
    BH, NC, L = x.shape[0], p.n_chunks, p.L
    Tp, dk, dv = NC * L, x.shape[2], y.shape[2]
    sb, warps = walk_tiles(BH, dk, dv, config)
    bk, bv = min(dk, sb), min(dv, sb)
    kernel = functools.partial(_gpu_walk_kernel, L=L, NC=NC, reverse=reverse, mm=mm_dtype(x.dtype))
    return pl.pallas_call(
        kernel, grid=(BH, dk // bk, dv // bv),
        in_specs=[pl.BlockSpec((None, Tp, bk), lambda b, i, j: (b, 0, i)),
                  pl.BlockSpec((None, Tp, bv), lambda b, i, j: (b, 0, j)),
                  pl.BlockSpec((None, NC, L, COEF_COLS), lambda b, i, j: (b, 0, 0, 0)),
                  pl.BlockSpec((None, bk, bv), lambda b, i, j: (b, i, j)),
                  pl.BlockSpec((None, 1, bk), lambda b, i, j: (b, 0, i))],
        # n's blocks are written by every d_v block, with the same values
        out_specs=[pl.BlockSpec((None, NC, bk, bv), lambda b, i, j: (b, 0, i, j)),
                   pl.BlockSpec((None, NC, 1, bk), lambda b, i, j: (b, 0, 0, i)),
                   pl.BlockSpec((None, bk, bv), lambda b, i, j: (b, i, j)),
                   pl.BlockSpec((None, 1, bk), lambda b, i, j: (b, 0, i))],
        out_shape=[jax.ShapeDtypeStruct((BH, NC, dk, dv), state_dtype), jax.ShapeDtypeStruct((BH, NC, 1, dk), F32),
                   jax.ShapeDtypeStruct((BH, dk, dv), F32), jax.ShapeDtypeStruct((BH, 1, dk), F32)],
        compiler_params=_compiler_params(interpret, warps, config.num_stages), interpret=interpret,
    )(x, y, coefs, s0, n0)


def _core(q_r, k_r, n_r, gc, gr, m_in, *, scale, eps, mm):
    """A chunk's weights, scaled queries, masked scores and normaliser (see ``scores``)."""
    x = chunk_weights(gc, gr, m_in, q_r.shape[0])
    return (x,) + scores(q_r[...], k_r[...], n_r[...], x, scale=scale, eps=eps, mm=mm)


def _gpu_out_kernel(q_r, k_r, v_r, gc_r, gr_r, C_r, n_r, m_r, h_r, st_r, *, nv, bv, scale, eps, mm):
    """One chunk's outputs: the scores once, then a loop over the ``nv`` value blocks of
    ``bv`` columns."""
    L = q_r.shape[0]
    gc, gr = gates_from_refs(gc_r, gr_r)
    x, qs, s, den, denom = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
    s_mm, qs_mm = s.astype(mm), qs.astype(mm)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        num = dot(s_mm, v_r[:, vc], mm) + x.w * dot(qs_mm, C_r[:, vc], mm)
        h_r[:, vc] = (num / denom).astype(h_r.dtype)
        return carry

    lax.fori_loop(0, nv, block, 0)
    st_r[0:1, :] = col_to_row(x.m, L)
    st_r[1:2, :] = col_to_row(den, L)
    st_r[2:3, :] = col_to_row(x.w, L)
    st_r[3:4, :] = col_to_row((x.log_a >= x.intra).astype(F32), L)


def _gpu_dqk_kernel(q_r, k_r, v_r, dh_r, gc_r, gr_r, C_r, n_r, m_r, dC_r, dn_r, gm_r, aux_r, dq_r, dk_r, dg_r, *dv_r,
                    nk, bk, nv, bv, scale, eps, mm):
    """dq, dk (columns kb*bk ...) and this block's share of the gate gradients for one chunk:
    bwd_chunk's algebra with the sums over d_v done in a loop over value blocks and the
    sums over d_qk split by key blocks (the d_qk-independent terms go to block 0). With
    ``dv_r`` (one key block) the loop also writes dv."""
    L = q_r.shape[0]
    kb = pl.program_id(0) % nk
    first = (kb == 0).astype(F32)
    cols = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    gc, gr = gates_from_refs(gc_r, gr_r)
    dhh = aux_r[:, 0:1]  # dh . h over all value columns
    # With the forward's denominators (aux columns 1, 2) the value loop needs nothing of the
    # chunk's scores, and they are computed after it: nothing L x L or L x d_qk stays live
    # beside the loop's accumulators. With dv inside, the loop needs the scores.
    late = not dv_r
    if late:
        denom, dden = aux_r[:, 1:2], aux_r[:, 2:3]
    else:
        x, qs, s, den, denom = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
        dden = jnp.where(jnp.abs(den) > jnp.exp(-x.m), -dhh / denom * jnp.sign(den), 0.0)
        q_kb, k_kb = q_r[:, cols].astype(F32) * scale, k_r[:, cols]
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    gm_row = first * (-eps * dhh / denom + jnp.where(last, gm_r[...], 0.0))

    def over_values(j, acc):
        G, CQ, Y, Ea = acc
        vj = (j + kb * (nv // nk)) % nv if nk > 1 else j  # each key block starts at its own value block
        vc = pl.ds(pl.multiple_of(vj * bv, bv), bv)
        v, dnum = v_r[:, vc], dh_r[:, vc].astype(F32) / denom
        C, dC = C_r[cols, vc], dC_r[cols, vc]
        if dv_r:
            dv_r[0][:, vc] = (dot_tn(s, dnum, mm) + x.c * dot(k_kb, dC, mm)).astype(dv_r[0].dtype)
        return (G + dot_nt(dnum, v, mm), CQ + dot_nt(dnum, C, mm), Y + dot_nt(v, dC, mm),
                Ea + jnp.sum(jnp.sum(C.astype(F32) * dC.astype(F32), axis=1, keepdims=True), axis=0, keepdims=True))

    acc = (jnp.zeros((L, L), F32), jnp.zeros((L, bk), F32), jnp.zeros((L, bk), F32), jnp.zeros((1, 1), F32))
    G, CQ, Y, Ea = lax.fori_loop(0, nv, over_values, acc)
    if late:
        x, qs, s, den, _ = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
        q_kb, k_kb = q_r[:, cols].astype(F32) * scale, k_r[:, cols]
    G = G + dden
    P = s * G
    dG = x.d * G
    n_kb, dn_kb = n_r[:, cols], dn_r[:, cols]
    carry_q = x.w * (CQ + dden * n_kb)
    dq_r[...] = ((dot(dG, k_kb, mm) + carry_q) * scale).astype(dq_r.dtype)
    R = jnp.sum(q_kb * carry_q, axis=1, keepdims=True)
    Y = Y + dn_kb
    dk_r[...] = (dot_tn(dG, q_kb, mm) + x.c * Y).astype(dk_r.dtype)
    E = x.c * jnp.sum(k_kb.astype(F32) * Y, axis=1, keepdims=True)
    E_a = x.w_a * (Ea + jnp.sum(n_kb * dn_kb, axis=1, keepdims=True))

    carry_wins = x.log_a >= x.intra
    onehot = x.mask & (x.log_g == x.intra) & jnp.logical_not(carry_wins)
    ties = jnp.maximum(jnp.sum(onehot.astype(F32), axis=1, keepdims=True), 1.0)
    Gm = jnp.where(onehot, gm_row / ties, 0.0)
    col_P = first * jnp.sum(P, axis=0, keepdims=True)
    col_Gm = jnp.sum(Gm, axis=0, keepdims=True)
    di = col_P + col_to_row(E, L) + col_Gm * (1.0 - gr.fl)
    db = (first * jnp.sum(P, axis=1, keepdims=True) + R + gm_row - row_to_col(col_P + col_Gm, L) - E
          + jnp.where(last, jnp.sum(E, axis=0, keepdims=True) + E_a, 0.0))
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    dg_r[0:1, :] = di
    dg_r[1:2, :] = jnp.sum(jnp.where(row >= col, db, 0.0), axis=0, keepdims=True) + col_Gm * gr.fl


def _gpu_dv_kernel(q_r, k_r, dh_r, gc_r, gr_r, n_r, m_r, dC_r, dv_r, *, nv, bv, scale, eps, mm):
    """dv = S^T dnum + c * (k dC) for one chunk: the scores once, a loop over the ``nv``
    value blocks of ``bv`` columns."""
    gc, gr = gates_from_refs(gc_r, gr_r)
    x, _, s, _, denom = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
    s_mm, k_mm = s.astype(mm), k_r[...].astype(mm)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        dnum = dh_r[:, vc].astype(F32) / denom
        dv_r[:, vc] = (dot_tn(s_mm, dnum, mm) + x.c * dot(k_mm, dC_r[:, vc], mm)).astype(dv_r.dtype)
        return carry

    lax.fori_loop(0, nv, block, 0)


def split_layout(p: Problem, config: MLSTMConfig):
    """(nk, bk, nb, bv): key blocks and value blocks of the backward. ``block_k`` is halved
    while two copies of the dq/dk loop's loads would not fit in shared memory: the float32
    kernel at d_qk 256 / d_v 512 with one key block asked 327,680 B (2 x 163,840) on an H100
    even at one pipeline stage (its transposed operands), over the 232,448 B there."""
    bk = min(p.d_qk, config.block_k)
    nb = value_blocks(p.d_qk, p.d_v, config)
    bv = p.d_v // nb
    isz, ssz = jnp.dtype(p.v.dtype).itemsize, jnp.dtype(mm_dtype(p.q.dtype)).itemsize
    while bk > 16 and 2 * dqk_loop_bytes(p.L, bk, bv, isz, isz, ssz) + 16384 > SMEM_BYTES:
        bk //= 2
    return p.d_qk // bk, bk, nb, bv


def dv_mode(p: Problem, config: MLSTMConfig) -> str:
    """dv's kernel layout, "fused" (inside the dq/dk kernel) or "loop"; ``dv="auto"``:
    "fused" when there is one key block, else "loop" (on an H100, dv inside two key blocks'
    programs made the whole backward 3-6 ms slower than the loop kernel at d_qk 256 / d_v
    512, and that layout was removed)."""
    nk = split_layout(p, config)[0]
    if config.dv == "auto":
        return "fused" if nk == 1 else "loop"
    if config.dv == "fused" and nk > 1:
        raise ValueError(f"MLSTMConfig.dv='fused' needs one key block, got {nk} (d_qk {p.d_qk} padded, block_k "
                         f"{config.block_k}, halved to fit shared memory): set block_k >= d_qk or dv='auto'/'loop'")
    return config.dv


def gpu_dqk(p: Problem, dh, Cs, ns, m_in4, dCs, dns, gm_end, rowstats, *, scale, eps, config: MLSTMConfig, interpret):
    """The backward's dq/dk/gates kernel: (dq, dk, dg) or, where dv is fused into it
    (:func:`dv_mode`), (dq, dk, dg, dv). ``rowstats`` (BH, NC, L, 3): per step dh . h, the
    forward's denominator and its gradient (from :func:`adjoint`)."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    nk, bk, nb, bv = split_layout(p, config)
    with_dv = dv_mode(p, config) == "fused"
    whole = lambda *sh: pl.BlockSpec((None, *sh), lambda b, c: (b // nk, c) + (0,) * (len(sh) - 1))  # noqa: E731
    chunk = lambda *sh: pl.BlockSpec((None, None, *sh), lambda b, c: (b // nk, c) + (0,) * len(sh))  # noqa: E731
    kcols = pl.BlockSpec((None, L, bk), lambda b, c: (b // nk, c, b % nk))
    # (BH, NC, L, 8): dhh, denom, dden in columns 0-2
    aux = jnp.pad(rowstats, ((0, 0), (0, 0), (0, 0), (0, GATE_ROWS - rowstats.shape[-1])))
    out_specs = [kcols, kcols, pl.BlockSpec((None, None, 2, L), lambda b, c: (b, c, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((BH, NC * L, p.d_qk), F32)] * 2 + [jax.ShapeDtypeStruct((BH * nk, NC, 2, L), F32)]
    if with_dv:
        out_specs.append(whole(L, p.d_v))
        out_shape.append(jax.ShapeDtypeStruct(p.v.shape, p.v.dtype))
    return pl.pallas_call(
        functools.partial(_gpu_dqk_kernel, nk=nk, bk=bk, nv=nb, bv=bv, scale=scale, eps=eps, mm=mm_dtype(p.q.dtype)),
        grid=(BH * nk, NC),
        in_specs=[whole(L, p.d_qk), whole(L, p.d_qk), whole(L, p.d_v), whole(L, p.d_v), chunk(L, GATE_ROWS),
                  chunk(GATE_ROWS, L), chunk(p.d_qk, p.d_v), chunk(1, p.d_qk), chunk(1, 1), chunk(p.d_qk, p.d_v),
                  chunk(1, p.d_qk), chunk(1, 1), chunk(L, GATE_ROWS)],
        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=_compiler_params(interpret, config.dqk_warps or config.num_warps,
                                         config.dqk_stages or config.num_stages,
                                         dqk_stage_bytes(p, dh.dtype, dCs.dtype, config)),
    )(p.q, p.k, p.v, dh, p.gcol, p.grow, Cs, ns, m_in4, dCs, dns, gm_end, aux)


def gpu_dv(p: Problem, dh, ns, m_in4, dCs, *, scale, eps, config: MLSTMConfig, interpret):
    """The backward's dv kernel: one program per (row, chunk) looping over the value blocks."""
    BH, NC = p.q.shape[0], p.n_chunks
    mm = mm_dtype(p.q.dtype)
    _, _, nb, bv = split_layout(p, config)
    sp = _chunk_specs(p)
    return pl.pallas_call(
        functools.partial(_gpu_dv_kernel, nv=nb, bv=bv, scale=scale, eps=eps, mm=mm),
        grid=(BH, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["n"], sp["m"], sp["C"]],
        out_specs=sp["v"], out_shape=jax.ShapeDtypeStruct(p.v.shape, p.v.dtype), interpret=interpret,
        compiler_params=_compiler_params(interpret, config.dv_warps or config.num_warps, config.num_stages,
                                         bv * (p.L * dh.dtype.itemsize + p.d_qk * dCs.dtype.itemsize)),
    )(p.q, p.k, dh, p.gcol, p.grow, ns, m_in4, dCs)


def _chunk_specs(p: Problem):
    """Grid (BH, NC): program (b, c) runs chunk c of row b."""
    L = p.L
    row = lambda *s: pl.BlockSpec((None, *s), lambda b, c: (b, c) + (0,) * (len(s) - 1))  # noqa: E731
    chunk = lambda *s: pl.BlockSpec((None, None, *s), lambda b, c: (b, c) + (0,) * len(s))  # noqa: E731
    return {"qk": row(L, p.d_qk), "v": row(L, p.d_v), "gc": chunk(L, GATE_ROWS), "gr": chunk(GATE_ROWS, L),
            "st": chunk(STAT_ROWS, L), "C": chunk(p.d_qk, p.d_v), "n": chunk(1, p.d_qk), "m": chunk(1, 1)}


def forward(p: Problem, state, out_dtype, *, scale, eps, save, config: MLSTMConfig, interpret):
    """h (BH, time_p, d_v), the final (C, n, m) and, with ``save``, what the backward needs."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    mm = mm_dtype(p.q.dtype)
    C0, n0, m0 = state
    m_in, m_T, w_a, c = chunk_scalars(p, m0[:, 0, 0])
    Cs, ns, C_T, n_T = walk(p, p.k, p.v, coefs(w_a, c, c), C0, n0, reverse=False, state_dtype=mm, config=config,
                            interpret=interpret)
    nb = value_blocks(p.d_qk, p.d_v, config)
    m_in4 = m_in[:, :, None, None]
    sp = _chunk_specs(p)
    h, stats = pl.pallas_call(
        functools.partial(_gpu_out_kernel, nv=nb, bv=p.d_v // nb, scale=scale, eps=eps, mm=mm),
        grid=(BH, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["C"], sp["n"], sp["m"]],
        out_specs=[sp["v"], sp["st"]],
        out_shape=[jax.ShapeDtypeStruct((BH, NC * L, p.d_v), out_dtype),
                   jax.ShapeDtypeStruct((BH, NC, STAT_ROWS, L), F32)],
        compiler_params=_compiler_params(interpret, config.fwd_warps or config.num_warps, config.num_stages,
                                         (p.d_v // nb) * (L * p.v.dtype.itemsize + p.d_qk * Cs.dtype.itemsize)),
        interpret=interpret,
    )(p.q, p.k, p.v, p.gcol, p.grow, Cs, ns, m_in4)
    outs = [h, C_T, n_T, m_T.reshape(BH, 1, 1)]
    if save:
        outs += [Cs, ns, m_in4, w_a, stats, h]
    return outs


def backward(p: Problem, dh, bounds, dstate, *, scale, eps, config: MLSTMConfig, interpret):
    """(dq, dk, dv, gate gradients (BH, NC, 2, L), dC0, dn0, gm0) in the kernels' layouts."""
    Cs, ns, m_in4 = bounds[:3]
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    dCs, dns, dC0, dn0, gm_in, gm_end, rowstats = adjoint(p, dh, bounds, dstate, scale=scale, eps=eps, config=config,
                                                          interpret=interpret)
    nk = split_layout(p, config)[0]
    out = gpu_dqk(p, dh, Cs, ns, m_in4, dCs, dns, gm_end, rowstats, scale=scale, eps=eps, config=config,
                  interpret=interpret)
    dq, dk, dg = out[:3]
    dv = out[3] if len(out) > 3 else gpu_dv(p, dh, ns, m_in4, dCs, scale=scale, eps=eps, config=config,
                                            interpret=interpret)
    return dq, dk, dv, dg.reshape(BH, nk, NC, 2, L).sum(axis=1), dC0, dn0, gm_in[:, :1, None]


def adjoint(p: Problem, dh, bounds, dstate, *, scale, eps, config: MLSTMConfig, interpret):
    """The backward's sequential part: the adjoint walk (each chunk's end-state gradient
    dCs, dns; the initial state's dC0, dn0) and the stabiliser gradients gm_in / gm_end
    (BH, NC) by an associative scan; also ``rowstats`` (BH, NC, L, 3): per step dhh = dh . h,
    the forward's denominator ``denom`` and its gradient ``dden``."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    mm = mm_dtype(p.q.dtype)
    Cs, ns, m_in4, w_a, stats, h = bounds
    dC_T, dn_T, gm_T = dstate
    m, den, w, cw = (stats[:, :, j, :] for j in range(STAT_ROWS))
    dhh = jnp.sum(dh.astype(F32) * h.astype(F32), axis=-1).reshape(BH, NC, L)
    denom = jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps
    dden = jnp.where(jnp.abs(den) > jnp.exp(-m), -dhh / denom * jnp.sign(den), 0.0)
    dCs, dns, dC0, dn0 = walk(p, p.q, dh, coefs(w_a, scale * w / denom, scale * w * dden), dC_T, dn_T,
                              reverse=True, state_dtype=mm, config=config, interpret=interpret)
    # The stabiliser's gradient entering each chunk's end: gm_in = A + B gm_end, chunk by
    # chunk from the last (A: the chunk's own eps terms on steps whose m_t is the carried
    # one, B: whether the last step's is).
    A = jnp.sum(cw * (-eps * dhh / denom), axis=-1)
    B = cw[..., -1]

    def compose(later, here):  # here o later, for gm_in = A + B gm_end
        return here[0] + here[1] * later[0], here[1] * later[1]

    Ac, Bc = lax.associative_scan(compose, (A, B), axis=1, reverse=True)
    gm_in = Ac + Bc * gm_T[:, :, 0]
    gm_end = jnp.concatenate([gm_in[:, 1:], gm_T[:, :, 0]], axis=1)
    return dCs, dns, dC0, dn0, gm_in, gm_end[:, :, None, None], jnp.stack([dhh, denom, dden], axis=-1)
