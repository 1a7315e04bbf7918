"""Pallas GPU (Triton) kernels for ``mlstm``: the chunk-parallel forward and backward.

The chunk math (gate packing, the per-chunk weights, outputs and adjoint) is shared with
the TPU kernels in :mod:`mnemax.kernels.pallas_mlstm`, which also holds the entry points
(``forward``/``backward`` call :func:`forward`/:func:`backward` here for ``platform="gpu"``).
``GPU_OPTIONS`` are the kernels' tuning knobs; they are read while tracing (``mlstm`` puts
them in its jit cache key).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .dispatch import gpu_sm_count as _sm_count
from .pallas_mlstm import (
    F32,
    GATE_ROWS,
    NEG,
    Problem,
    _col_to_row,
    _dot,
    _dot_nt,
    _dot_tn,
    _gates_from_refs,
    _mm_dtype,
    _row_to_col,
    _scores,
    _weights,
    bwd_chunk,
)


# ----------------------------------------------------------------------------- GPU (Triton), chunk-parallel
#
# The GPU path splits the chunkwise form into what is sequential and what is not:
#
# 1. gate scalars (XLA, O(time)): each chunk's incoming stabiliser m_in follows the
#    max-plus recurrence m_end = max(m_in + b_end [no reset in the chunk], m_loc), run as an
#    associative scan over chunks; from it the chunk-end weights w_a and c_s (below);
# 2. the state walk (Pallas, sequential over chunks, parallel over (row, d_qk block, d_v
#    block)): C_end = w_a C_in + (c * K)^T V, n_end = w_a n_in + (c * K)^T 1, saving every
#    chunk's incoming state (in the matmul dtype; float32 carry);
# 3. the outputs (Pallas, one program per (row, chunk) -- or per (row, d_v block, chunk),
#    see ``fwd`` -- all in parallel): the intra-chunk matmuls plus the incoming state's
#    term, and per-step stabiliser m_t, denominator sum den_t, carried-state weight w_t and
#    arg-max flag, kept for the backward.
#
# The backward is the same in reverse: the adjoint walk dC_in = w_a dC_end + (e * Q)^T dH,
# e_t = s w_t / denom_t (and dn with s w_t dden_t) saves each chunk's end-state gradient;
# the stabiliser's gradient (an eps-sized term along each m_t's arg-max) is a scalar affine
# recurrence over chunks (XLA associative scan); then per-chunk programs recompute their
# chunk and write dq, dk, dv and the gate gradients, in parallel (``bwd``, ``dv``).

# num_warps / num_stages of the per-chunk kernels; block_v: value columns per per-chunk
# program (None: the largest power of two <= d_v with d_qk * block_v <= 16384); state_block:
# the (d_qk, d_v) tile of one state-walk program (state_warps warps; None: 128 x 128 tiles
# on 8 warps when that gives the walk at least one program per SM, else 64 x 64 on 4: a
# batch of one at d_qk 256 / d_v 512 has 8 rows x 8 tiles of 128, half an H100).
# fwd: "grid" -- one output program per (row, d_v block, chunk), each recomputing the
# chunk's scores; "loop" -- one per (row, chunk), scores once, a loop over the d_v blocks.
# bwd: "fused" -- one program per (row, d_v block, chunk) for all gradients, partials of dq,
# dk and the gates summed afterwards; "split" -- one program per (row, d_qk block of
# block_k, chunk) for dq, dk and the gates, looping over the value blocks (nothing
# recomputed per value block, no dq/dk partials), and dv by ``dv``: "grid" -- one program
# per (row, d_v block, chunk); "loop" -- one per (row, chunk) looping over the d_v blocks;
# "fused" -- inside the dq/dk programs' value loops, each key block writing an equal share
# of the value blocks (loading the other key blocks' rows of dC for them); "auto" --
# "fused" where there is one key block, else "loop". fwd_warps: the forward output
# kernel's warps (None: num_warps). bwd_denom: "saved" -- the dq/dk kernel takes each
# step's denominator and its gradient from the forward's statistics and computes the chunk's
# scores after its value loop, so that no L x L or L x d_qk value is live beside the loop's
# accumulators; "recompute" -- the scores first, the denominators from them (the layout
# before; with dv "fused" the loop needs the scores, so that layout is used there).
# dqk_warps / dqk_stages: the dq/dk kernel's warps and pipeline stages (None: num_warps /
# num_stages); dv_warps: the dv kernel's. With the scores after the value loop, 8 warps
# halve each thread's share of the loop's three float32 accumulators (G, CQ, Y: 160
# registers a thread on 4 warps): the kernel went from 10.5 to 5.0 ms at 64k on an H100,
# and to 4.3 ms with 3 pipeline stages (3 x 48 KB of loads in bf16; float32 gets fewer,
# see pipeline_stages).
# Defaults: the fastest measured on an H100 at d_qk 256 / d_v 512 (benchmarks/RESULTS.md):
# two key blocks of 128 and dv in the loop kernel (one key block of 256 held two 64 x 256
# float32 accumulators per program; with the scores after the loop it is still 1.5 ms
# slower at 64k), the dq/dk kernel on 8 warps and 3 stages, the others on 4 warps and
# num_stages 2 (Triton software pipelining of the per-chunk loops: 4-5% faster).
GPU_OPTIONS = {"num_warps": 4, "fwd_warps": 4, "num_stages": 2, "block_v": None, "state_block": None, "state_warps": None,
               "bwd": "split", "block_k": 128, "fwd": "loop", "dv": "auto", "bwd_denom": "saved",
               "dqk_warps": 8, "dqk_stages": 3, "dv_warps": None}
COEF_COLS = 4  # state-walk coefficients per step: key/query weight, w_a (chunk), n weight, 0


def value_blocks(d_qk: int, d_v: int) -> int:
    """How many per-chunk programs split one row's (padded, power-of-two) ``d_v`` columns."""
    bv = GPU_OPTIONS["block_v"] or max(16, 16384 // d_qk)
    return max(1, d_v // min(d_v, 1 << (max(16, bv).bit_length() - 1)))


def walk_tiles(rows: int, d_qk: int, d_v: int) -> tuple[int, int]:
    """The state walk's (tile, warps): GPU_OPTIONS' ``state_block`` / ``state_warps``, or
    when unset 128 on 8 warps if ``rows`` (batch x heads) x its tiles fill every SM, else 64
    on 4 warps (each walk program is sequential over the chunks, so idle SMs are lost)."""
    sb, warps = GPU_OPTIONS["state_block"], GPU_OPTIONS["state_warps"]
    if sb is None:
        tiles = rows * -(-d_qk // 128) * -(-d_v // 128)
        sb = 128 if tiles >= _sm_count() else 64
    if warps is None:
        warps = 8 if sb >= 128 else 4
    if sb < 16 or sb & (sb - 1):
        raise ValueError(f"GPU_OPTIONS['state_block']: got {sb}; expected a power of two >= 16 or None")
    return sb, warps


SMEM_BYTES = 232448  # the most shared memory one Hopper (sm_90) block may ask for
# What a per-chunk kernel holds in shared memory besides its pipelined loop's tiles. The
# float32 dq/dk kernel at d_qk 256 / d_v 512 asked for 344,064 B on an H100: 2 stages of
# 163,840 B (dqk_stage_bytes) plus 16 KB; this keeps 4x that for the layout conversions.
SMEM_RESERVE = 64 * 1024


def pipeline_stages(stage_bytes: int, stages: int | None = None) -> int:
    """``stages`` or ``GPU_OPTIONS["num_stages"]`` (Triton's software pipelining keeps that
    many copies of a loop iteration's loads in shared memory), lowered until the copies of
    ``stage_bytes`` fit in ``SMEM_BYTES`` beside ``SMEM_RESERVE``; at least 1."""
    fit = (SMEM_BYTES - SMEM_RESERVE) // max(1, int(stage_bytes))
    return max(1, min(int(stages or GPU_OPTIONS["num_stages"]), fit))


def dqk_stage_bytes(p: Problem, dh_dtype, state_dtype) -> int:
    """One iteration of the dq/dk kernel's value loop: v and dh (L x bv), C and dC (bk x bv),
    and with dv inside the other key blocks' rows of dC."""
    nk, bk, nb, bv = _split_layout(p)
    isz = lambda d: jnp.dtype(d).itemsize  # noqa: E731
    other = (nk - 1) * bk * bv * isz(state_dtype) if _dv_mode(p) == "fused" else 0
    return _dqk_loop_bytes(p.L, bk, bv, isz(p.v.dtype), isz(dh_dtype), isz(state_dtype)) + other


def _dqk_loop_bytes(L, bk, bv, v_size, dh_size, state_size) -> int:
    """The dq/dk loop's loads per value block: v and dh (L x bv), C and dC (bk x bv)."""
    return L * bv * (v_size + dh_size) + 2 * bk * bv * state_size


def _gpu_params(interpret, warps_key="num_warps", warps=None, stage_bytes=None, stages_key="num_stages"):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    warps = warps or GPU_OPTIONS.get(warps_key) or GPU_OPTIONS["num_warps"]
    want = GPU_OPTIONS.get(stages_key) or GPU_OPTIONS["num_stages"]
    stages = want if stage_bytes is None else pipeline_stages(stage_bytes, want)
    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def chunk_scalars(p: Problem, m0):
    """Gate-only chunk quantities (see above): ``m_in`` (BH, NC) each chunk's incoming
    stabiliser, ``m_T`` (BH,) the final one, ``w_a`` (BH, NC) the incoming state's weight in
    the chunk-end state and ``c`` (BH, NC, L) each key's (0 at padding and before the
    chunk's last reset). ``m0``: (BH,)."""
    gi, b, r, ok, g = (p.grow[:, :, j, :] for j in range(5))
    b_end, r_end = b[..., -1], r[..., -1]
    live = (r == r_end[..., None]) & (ok > 0)
    m_loc = jnp.max(jnp.where(live, b_end[..., None] - b + g, NEG), axis=-1)
    G = jnp.where(r_end == 0, b_end, NEG)  # a reset inside the chunk cuts the carry

    def compose(e1, e2):  # x -> max(x + G, M), applied e1 then e2
        return e1[0] + e2[0], jnp.maximum(e1[1] + e2[0], e2[1])

    Gc, Mc = lax.associative_scan(compose, (G, m_loc), axis=1)
    m_end = jnp.maximum(m0[:, None] + Gc, Mc)
    m_in = jnp.concatenate([m0[:, None], m_end[:, :-1]], axis=1)
    w_a = jnp.exp(jnp.where(r_end == 0, b_end + m_in, NEG) - m_end)
    c = jnp.exp(jnp.where(live, b_end[..., None] - b + gi, NEG) - m_end[..., None])
    return m_in, m_end[:, -1], w_a, c


def _coefs(w_a, x_weight, n_weight):
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
        S = a * S + _dot_tn(x * co_r[c, :, 0:1], y_r[t, :], mm)
        n = a * n + jnp.sum(x * co_r[c, :, 2:3], axis=0, keepdims=True)
        return S, n

    S, n = lax.fori_loop(0, NC, body, (s0_r[...], n0_r[...]))
    sT_r[...], nT_r[...] = S, n


def _gpu_walk(p: Problem, x, y, coefs, s0, n0, *, reverse, state_dtype, interpret):
    """The state walk over all rows: returns (states (BH, NC, d_qk, d_v) before each chunk's
    update in walk order, n states (BH, NC, 1, d_qk), final S (BH, d_qk, d_v), final n (BH, 1,
    d_qk))."""
    BH, NC, L = x.shape[0], p.n_chunks, p.L
    Tp, dk, dv = NC * L, x.shape[2], y.shape[2]
    sb, warps = walk_tiles(BH, dk, dv)
    bk, bv = min(dk, sb), min(dv, sb)
    kernel = functools.partial(_gpu_walk_kernel, L=L, NC=NC, reverse=reverse, mm=_mm_dtype(x.dtype))
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
        compiler_params=_gpu_params(interpret, warps=warps), interpret=interpret,
    )(x, y, coefs, s0, n0)


STAT_ROWS = 4  # per-step forward statistics kept for the backward: m_t, den_t, w_t, carry wins


def _gpu_out_kernel(q_r, k_r, v_r, gc_r, gr_r, C_r, n_r, m_r, h_r, st_r, *, nv, bv, scale, eps, mm):
    """One chunk's outputs for the program's value columns: the scores once, then a loop
    over their ``nv`` blocks of ``bv`` columns (``nv`` = 1 for the "grid" layout)."""
    L = q_r.shape[0]
    gc, gr = _gates_from_refs(gc_r, gr_r)
    x, qs, s, den, denom = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
    s_mm, qs_mm = s.astype(mm), qs.astype(mm)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        num = _dot(s_mm, v_r[:, vc], mm) + x.w * _dot(qs_mm, C_r[:, vc], mm)
        h_r[:, vc] = (num / denom).astype(h_r.dtype)
        return carry

    lax.fori_loop(0, nv, block, 0)
    st_r[0:1, :] = _col_to_row(x.m, L)
    st_r[1:2, :] = _col_to_row(den, L)
    st_r[2:3, :] = _col_to_row(x.w, L)
    st_r[3:4, :] = _col_to_row((x.log_a >= x.intra).astype(F32), L)


def _gpu_grad_kernel(q_r, k_r, v_r, dh_r, gc_r, gr_r, C_r, n_r, m_r, dC_r, dn_r, gm_r, dq_r, dk_r, dv_r, dg_r, *, nb,
                     scale, eps, mm):
    # Linear in the cotangents: the d_v block programs split dh and dC by columns; dn and
    # gm go to block 0 only, and their dq, dk and gate partials are summed afterwards.
    first = (pl.program_id(0) % nb == 0).astype(F32)
    gc, gr = _gates_from_refs(gc_r, gr_r)
    dq, dk, dv, di, dlogf = bwd_chunk(
        q_r[...], k_r[...], v_r[...], dh_r[...], gc, gr, C_r[...], n_r[...], m_r[...],
        dC_r[...], dn_r[...] * first, gm_r[...] * first, scale=scale, eps=eps, mm=mm, carry=False)
    dq_r[...], dk_r[...], dv_r[...] = dq.astype(dq_r.dtype), dk.astype(dk_r.dtype), dv.astype(dv_r.dtype)
    dg_r[0:1, :], dg_r[1:2, :] = di, dlogf


def _core(q_r, k_r, n_r, gc, gr, m_in, *, scale, eps, mm):
    """A chunk's weights, scaled queries, masked scores and normaliser (see _scores)."""
    x = _weights(gc, gr, m_in, q_r.shape[0])
    return (x,) + _scores(q_r[...], k_r[...], n_r[...], x, scale=scale, eps=eps, mm=mm)


def _gpu_dqk_kernel(q_r, k_r, v_r, dh_r, gc_r, gr_r, C_r, n_r, m_r, dC_r, dn_r, gm_r, aux_r, dq_r, dk_r, dg_r, *dv_r,
                    nk, bk, nv, bv, scale, eps, mm, saved_denom):
    """dq, dk (columns kb*bk ...) and this block's share of the gate gradients for one chunk:
    bwd_chunk's algebra with the sums over d_v done in a loop over value blocks and the
    sums over d_qk split by key blocks (the d_qk-independent terms go to block 0). With
    ``dv_r`` the loop also writes dv: key block kb owns the ``nv / nk`` value blocks from
    ``kb * nv / nk`` on, visits them first, and for them also loads the other key blocks'
    rows of dC (dv needs k dC over all of d_qk)."""
    L = q_r.shape[0]
    kb = pl.program_id(0) % nk
    first = (kb == 0).astype(F32)
    cols = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    gc, gr = _gates_from_refs(gc_r, gr_r)
    dhh = aux_r[:, 0:1]  # dh . h over all value columns
    # With the forward's denominators (aux columns 1, 2) the value loop needs nothing of the
    # chunk's scores, and they are computed after it: nothing L x L or L x d_qk stays live
    # beside the loop's accumulators. With dv inside, the loop needs the scores.
    late = saved_denom and not dv_r
    if late:
        denom, dden = aux_r[:, 1:2], aux_r[:, 2:3]
    else:
        x, qs, s, den, denom = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
        dden = jnp.where(jnp.abs(den) > jnp.exp(-x.m), -dhh / denom * jnp.sign(den), 0.0)
        q_kb, k_kb = q_r[:, cols].astype(F32) * scale, k_r[:, cols]
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    gm_row = first * (-eps * dhh / denom + jnp.where(last, gm_r[...], 0.0))

    own = nv // nk  # value blocks whose dv this program writes (with dv_r)
    others = [pl.ds(pl.multiple_of(((kb + o) % nk) * bk, bk), bk) for o in range(1, nk)] if dv_r else []
    k_others = [k_r[:, r] for r in others]

    def over_values(j, acc, write_dv):
        G, CQ, Y, Ea = acc
        vj = (j + kb * own) % nv if nk > 1 else j
        vc = pl.ds(pl.multiple_of(vj * bv, bv), bv)
        v, dnum = v_r[:, vc], dh_r[:, vc].astype(F32) / denom
        C, dC = C_r[cols, vc], dC_r[cols, vc]
        if write_dv:
            kdc = _dot(k_kb, dC, mm)
            for k_o, rows in zip(k_others, others):
                kdc = kdc + _dot(k_o, dC_r[rows, vc], mm)
            dv_r[0][:, vc] = (_dot_tn(s, dnum, mm) + x.c * kdc).astype(dv_r[0].dtype)
        return (G + _dot_nt(dnum, v, mm), CQ + _dot_nt(dnum, C, mm), Y + _dot_nt(v, dC, mm),
                Ea + jnp.sum(jnp.sum(C.astype(F32) * dC.astype(F32), axis=1, keepdims=True), axis=0, keepdims=True))

    acc = (jnp.zeros((L, L), F32), jnp.zeros((L, bk), F32), jnp.zeros((L, bk), F32), jnp.zeros((1, 1), F32))
    start = 0
    if dv_r:
        acc = lax.fori_loop(0, own, functools.partial(over_values, write_dv=True), acc)
        start = own
    if start < nv:
        acc = lax.fori_loop(start, nv, functools.partial(over_values, write_dv=False), acc)
    G, CQ, Y, Ea = acc
    if late:
        x, qs, s, den, _ = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
        q_kb, k_kb = q_r[:, cols].astype(F32) * scale, k_r[:, cols]
    G = G + dden
    P = s * G
    dG = x.d * G
    n_kb, dn_kb = n_r[:, cols], dn_r[:, cols]
    carry_q = x.w * (CQ + dden * n_kb)
    dq_r[...] = ((_dot(dG, k_kb, mm) + carry_q) * scale).astype(dq_r.dtype)
    R = jnp.sum(q_kb * carry_q, axis=1, keepdims=True)
    Y = Y + dn_kb
    dk_r[...] = (_dot_tn(dG, q_kb, mm) + x.c * Y).astype(dk_r.dtype)
    E = x.c * jnp.sum(k_kb.astype(F32) * Y, axis=1, keepdims=True)
    E_a = x.w_a * (Ea + jnp.sum(n_kb * dn_kb, axis=1, keepdims=True))

    carry_wins = x.log_a >= x.intra
    onehot = x.mask & (x.log_g == x.intra) & jnp.logical_not(carry_wins)
    ties = jnp.maximum(jnp.sum(onehot.astype(F32), axis=1, keepdims=True), 1.0)
    Gm = jnp.where(onehot, gm_row / ties, 0.0)
    col_P = first * jnp.sum(P, axis=0, keepdims=True)
    col_Gm = jnp.sum(Gm, axis=0, keepdims=True)
    di = col_P + _col_to_row(E, L) + col_Gm * (1.0 - gr.fl)
    db = (first * jnp.sum(P, axis=1, keepdims=True) + R + gm_row - _row_to_col(col_P + col_Gm, L) - E
          + jnp.where(last, jnp.sum(E, axis=0, keepdims=True) + E_a, 0.0))
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    dg_r[0:1, :] = di
    dg_r[1:2, :] = jnp.sum(jnp.where(row >= col, db, 0.0), axis=0, keepdims=True) + col_Gm * gr.fl


def _gpu_dv_kernel(q_r, k_r, dh_r, gc_r, gr_r, n_r, m_r, dC_r, dv_r, *, nv, bv, scale, eps, mm):
    """dv = S^T dnum + c * (k dC) for the program's value columns of one chunk: the scores
    once, a loop over their ``nv`` blocks of ``bv`` columns (``nv`` = 1 for "grid")."""
    gc, gr = _gates_from_refs(gc_r, gr_r)
    x, _, s, _, denom = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
    s_mm, k_mm = s.astype(mm), k_r[...].astype(mm)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        dnum = dh_r[:, vc].astype(F32) / denom
        dv_r[:, vc] = (_dot_tn(s_mm, dnum, mm) + x.c * _dot(k_mm, dC_r[:, vc], mm)).astype(dv_r.dtype)
        return carry

    lax.fori_loop(0, nv, block, 0)


def _split_layout(p: Problem):
    """(nk, bk, nb, bv): key blocks and value blocks of the split backward. ``block_k`` is
    halved while two copies of the dq/dk loop's loads would not fit in shared memory: the
    float32 kernel at d_qk 256 / d_v 512 with one key block asked 327,680 B (2 x 163,840) on
    an H100 even at one pipeline stage (its transposed operands), over the 232,448 B there."""
    bk = min(p.d_qk, GPU_OPTIONS["block_k"])
    nb = value_blocks(p.d_qk, p.d_v)
    bv = p.d_v // nb
    isz, ssz = jnp.dtype(p.v.dtype).itemsize, jnp.dtype(_mm_dtype(p.q.dtype)).itemsize
    while bk > 16 and 2 * _dqk_loop_bytes(p.L, bk, bv, isz, isz, ssz) + 16384 > SMEM_BYTES:
        bk //= 2
    return p.d_qk // bk, bk, nb, bv


def _dv_mode(p: Problem) -> str:
    """dv's kernel layout; "auto": inside the dq/dk kernel when it has one key block, else
    the per-(row, chunk) loop kernel (on an H100, dv inside two key blocks' programs made
    the whole backward 3-6 ms slower than the loop kernel at d_qk 256 / d_v 512)."""
    mode = GPU_OPTIONS["dv"]
    if mode not in ("grid", "loop", "fused", "auto"):
        raise ValueError(f"GPU_OPTIONS['dv'] must be 'grid', 'loop', 'fused' or 'auto', got {mode!r}")
    if mode == "auto":
        return "fused" if _split_layout(p)[0] == 1 else "loop"
    return mode


def gpu_dqk(p: Problem, dh, Cs, ns, m_in4, dCs, dns, gm_end, rowstats, *, scale, eps, interpret):
    """The split backward's dq/dk/gates kernel: (dq, dk, dg) or, with ``GPU_OPTIONS["dv"]
    == "fused"``, (dq, dk, dg, dv). ``rowstats`` (BH, NC, L, 3): per step dh . h, the
    forward's denominator and its gradient (from :func:`adjoint`)."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    nk, bk, nb, bv = _split_layout(p)
    with_dv = _dv_mode(p) == "fused"
    if with_dv and nb % nk:
        raise ValueError(f"GPU_OPTIONS['dv'] = 'fused' needs the {nb} value blocks to split evenly over the {nk} "
                         f"key blocks (d_qk {p.d_qk}, block_k {bk}; d_v {p.d_v}, block_v {bv})")
    whole = lambda *sh: pl.BlockSpec((None, *sh), lambda b, c: (b // nk, c) + (0,) * (len(sh) - 1))  # noqa: E731
    chunk = lambda *sh: pl.BlockSpec((None, None, *sh), lambda b, c: (b // nk, c) + (0,) * len(sh))  # noqa: E731
    kcols = pl.BlockSpec((None, L, bk), lambda b, c: (b // nk, c, b % nk))
    if GPU_OPTIONS["bwd_denom"] not in ("saved", "recompute"):
        raise ValueError(f"GPU_OPTIONS['bwd_denom'] must be 'saved' or 'recompute', got {GPU_OPTIONS['bwd_denom']!r}")
    # (BH, NC, L, 8): dhh, denom, dden in columns 0-2
    aux = jnp.pad(rowstats, ((0, 0), (0, 0), (0, 0), (0, GATE_ROWS - rowstats.shape[-1])))
    out_specs = [kcols, kcols, pl.BlockSpec((None, None, 2, L), lambda b, c: (b, c, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((BH, NC * L, p.d_qk), F32)] * 2 + [jax.ShapeDtypeStruct((BH * nk, NC, 2, L), F32)]
    if with_dv:
        out_specs.append(whole(L, p.d_v))
        out_shape.append(jax.ShapeDtypeStruct(p.v.shape, p.v.dtype))
    return pl.pallas_call(
        functools.partial(_gpu_dqk_kernel, nk=nk, bk=bk, nv=nb, bv=bv, scale=scale, eps=eps, mm=_mm_dtype(p.q.dtype),
                          saved_denom=GPU_OPTIONS["bwd_denom"] == "saved"),
        grid=(BH * nk, NC),
        in_specs=[whole(L, p.d_qk), whole(L, p.d_qk), whole(L, p.d_v), whole(L, p.d_v), chunk(L, GATE_ROWS),
                  chunk(GATE_ROWS, L), chunk(p.d_qk, p.d_v), chunk(1, p.d_qk), chunk(1, 1), chunk(p.d_qk, p.d_v),
                  chunk(1, p.d_qk), chunk(1, 1), chunk(L, GATE_ROWS)],
        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=_gpu_params(interpret, "dqk_warps", stage_bytes=dqk_stage_bytes(p, dh.dtype, dCs.dtype),
                                    stages_key="dqk_stages"),
    )(p.q, p.k, p.v, dh, p.gcol, p.grow, Cs, ns, m_in4, dCs, dns, gm_end, aux)


def gpu_dv(p: Problem, dh, ns, m_in4, dCs, *, scale, eps, interpret):
    """The split backward's dv kernel ("grid" or "loop", see GPU_OPTIONS)."""
    BH, NC = p.q.shape[0], p.n_chunks
    mm = _mm_dtype(p.q.dtype)
    _, _, nb, bv = _split_layout(p)
    programs = 1 if _dv_mode(p) == "loop" else nb  # per (row, chunk)
    sp = _chunk_specs(p, programs)
    return pl.pallas_call(
        functools.partial(_gpu_dv_kernel, nv=nb // programs, bv=bv, scale=scale, eps=eps, mm=mm),
        grid=(BH * programs, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["n"], sp["m"], sp["C"]],
        out_specs=sp["v"], out_shape=jax.ShapeDtypeStruct(p.v.shape, p.v.dtype), interpret=interpret,
        compiler_params=_gpu_params(interpret, "dv_warps",
                                    stage_bytes=bv * (p.L * dh.dtype.itemsize + p.d_qk * dCs.dtype.itemsize)),
    )(p.q, p.k, dh, p.gcol, p.grow, ns, m_in4, dCs)


def _gpu_grads_split(p: Problem, dh, Cs, ns, m_in4, dCs, dns, gm_end, rowstats, *, scale, eps, interpret):
    """The "split" backward's per-chunk kernels (see GPU_OPTIONS): (dq, dk, dv, dg)."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    nk = _split_layout(p)[0]
    out = gpu_dqk(p, dh, Cs, ns, m_in4, dCs, dns, gm_end, rowstats, scale=scale, eps=eps, interpret=interpret)
    dq, dk, dg = out[:3]
    dv = out[3] if len(out) > 3 else gpu_dv(p, dh, ns, m_in4, dCs, scale=scale, eps=eps, interpret=interpret)
    return dq, dk, dv, dg.reshape(BH, nk, NC, 2, L).sum(axis=1)


def _chunk_specs(p: Problem, nb: int):
    """Grid (BH * nb, NC): program (b, c) runs chunk c of row b // nb on value columns block
    b % nb. ``*_p`` arrays have a leading BH * nb axis (one slot per program)."""
    L, dvb = p.L, p.d_v // nb
    row = lambda *s: pl.BlockSpec((None, *s), lambda b, c: (b // nb, c) + (0,) * (len(s) - 1))  # noqa: E731
    chunk = lambda *s: pl.BlockSpec((None, None, *s), lambda b, c: (b // nb, c) + (0,) * len(s))  # noqa: E731
    return {"qk": row(L, p.d_qk), "v": pl.BlockSpec((None, L, dvb), lambda b, c: (b // nb, c, b % nb)),
            "gc": chunk(L, GATE_ROWS), "gr": chunk(GATE_ROWS, L), "st": chunk(STAT_ROWS, L),
            "C": pl.BlockSpec((None, None, p.d_qk, dvb), lambda b, c: (b // nb, c, 0, b % nb)),
            "n": chunk(1, p.d_qk), "m": chunk(1, 1),
            "qk_p": pl.BlockSpec((None, L, p.d_qk), lambda b, c: (b, c, 0)),
            "dg_p": pl.BlockSpec((None, None, 2, L), lambda b, c: (b, c, 0, 0))}


def forward(p: Problem, state, out_dtype, *, scale, eps, save, interpret):
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    mm = _mm_dtype(p.q.dtype)
    C0, n0, m0 = state
    m_in, m_T, w_a, c = chunk_scalars(p, m0[:, 0, 0])
    Cs, ns, C_T, n_T = _gpu_walk(p, p.k, p.v, _coefs(w_a, c, c), C0, n0, reverse=False, state_dtype=mm,
                                 interpret=interpret)
    nb = value_blocks(p.d_qk, p.d_v)
    m_in4 = m_in[:, :, None, None]
    if GPU_OPTIONS["fwd"] not in ("grid", "loop"):
        raise ValueError(f"GPU_OPTIONS['fwd'] must be 'grid' or 'loop', got {GPU_OPTIONS['fwd']!r}")
    programs = 1 if GPU_OPTIONS["fwd"] == "loop" else nb  # per (row, chunk)
    sp = _chunk_specs(p, programs)
    h, stats = pl.pallas_call(
        functools.partial(_gpu_out_kernel, nv=nb // programs, bv=p.d_v // nb, scale=scale, eps=eps, mm=mm),
        grid=(BH * programs, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["C"], sp["n"], sp["m"]],
        out_specs=[sp["v"], sp["st"]],  # stats: every d_v block writes the same values
        out_shape=[jax.ShapeDtypeStruct((BH, NC * L, p.d_v), out_dtype),
                   jax.ShapeDtypeStruct((BH, NC, STAT_ROWS, L), F32)],
        compiler_params=_gpu_params(interpret, "fwd_warps", stage_bytes=(p.d_v // nb) * (
            L * p.v.dtype.itemsize + p.d_qk * Cs.dtype.itemsize)), interpret=interpret,
    )(p.q, p.k, p.v, p.gcol, p.grow, Cs, ns, m_in4)
    outs = [h, C_T, n_T, m_T.reshape(BH, 1, 1)]
    if save:
        outs += [Cs, ns, m_in4, w_a, stats, h]
    return outs


def backward(p: Problem, dh, bounds, dstate, *, scale, eps, interpret):
    Cs, ns, m_in4 = bounds[:3]
    dCs, dns, dC0, dn0, gm_in, gm_end, rowstats = adjoint(p, dh, bounds, dstate, scale=scale, eps=eps,
                                                          interpret=interpret)
    if GPU_OPTIONS["bwd"] == "split":
        dq, dk, dv, dg = _gpu_grads_split(p, dh, Cs, ns, m_in4, dCs, dns, gm_end, rowstats, scale=scale,
                                          eps=eps, interpret=interpret)
        return dq, dk, dv, dg, dC0, dn0, gm_in[:, :1, None]
    if GPU_OPTIONS["bwd"] != "fused":
        raise ValueError(f"GPU_OPTIONS['bwd'] must be 'fused' or 'split', got {GPU_OPTIONS['bwd']!r}")
    BH, NC = p.q.shape[0], p.n_chunks
    nb = value_blocks(p.d_qk, p.d_v)
    sp = _chunk_specs(p, nb)
    dq, dk, dv, dg = pl.pallas_call(
        functools.partial(_gpu_grad_kernel, nb=nb, scale=scale, eps=eps, mm=_mm_dtype(p.q.dtype)), grid=(BH * nb, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["v"], sp["gc"], sp["gr"], sp["C"], sp["n"], sp["m"], sp["C"], sp["n"],
                  sp["m"]],
        out_specs=[sp["qk_p"], sp["qk_p"], sp["v"], sp["dg_p"]],
        out_shape=[jax.ShapeDtypeStruct((BH * nb, NC * p.L, p.d_qk), F32)] * 2
        + [jax.ShapeDtypeStruct(p.v.shape, p.v.dtype), jax.ShapeDtypeStruct((BH * nb, NC, 2, p.L), F32)],
        compiler_params=_gpu_params(interpret), interpret=interpret,
    )(p.q, p.k, p.v, dh, p.gcol, p.grow, Cs, ns, m_in4, dCs, dns, gm_end)
    total = lambda a: a.reshape(BH, nb, *a.shape[1:]).sum(axis=1)  # noqa: E731
    return total(dq), total(dk), dv, total(dg), dC0, dn0, gm_in[:, :1, None]


def adjoint(p: Problem, dh, bounds, dstate, *, scale, eps, interpret):
    """The backward's sequential part: the adjoint walk (each chunk's end-state gradient
    dCs, dns; the initial state's dC0, dn0) and the stabiliser gradients gm_in / gm_end
    (BH, NC) by an associative scan; also ``rowstats`` (BH, NC, L, 3): per step dhh = dh . h,
    the forward's denominator ``denom`` and its gradient ``dden``."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    mm = _mm_dtype(p.q.dtype)
    Cs, ns, m_in4, w_a, stats, h = bounds
    dC_T, dn_T, gm_T = dstate
    m, den, w, cw = (stats[:, :, j, :] for j in range(STAT_ROWS))
    dhh = jnp.sum(dh.astype(F32) * h.astype(F32), axis=-1).reshape(BH, NC, L)
    denom = jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps
    dden = jnp.where(jnp.abs(den) > jnp.exp(-m), -dhh / denom * jnp.sign(den), 0.0)
    dCs, dns, dC0, dn0 = _gpu_walk(p, p.q, dh, _coefs(w_a, scale * w / denom, scale * w * dden), dC_T, dn_T,
                                   reverse=True, state_dtype=mm, interpret=interpret)
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
