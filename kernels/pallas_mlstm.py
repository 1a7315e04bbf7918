"""Pallas kernels for ``mlstm`` (chunkwise mLSTM) on TPU and GPU, forward and backward.

The intra-chunk work is matmuls (``Q K^T`` masked by the decay matrix, times ``V``) and
the stabilised state ``(C, n, m)`` is carried across chunks (VMEM scratch on TPU; on GPU
a separate state-walk kernel with the state in registers). Per chunk of ``L`` steps, with ``b`` the log-forget sum
inside the chunk, ``r`` the number of resets so far inside the chunk and ``g`` the
stabiliser candidate of a key (``i~``, or ``max(i~, log sigma(f~))`` at a reset)::

    mask_ts = s <= t,  r_s == r_t,  s a real (not padding) step
    m_t     = max(b_t + m_in  [r_t == 0],  max_s (b_t - b_s + g_s) [mask])
    D_ts    = exp(b_t - b_s + i~_s - m_t) [mask],   w_t = exp(b_t + m_in - m_t) [r_t == 0]
    S       = (s Q K^T) * D
    h_t     = (S V + w Q C_in)_t / (max(|S 1 + w Q n_in|_t, exp(-m_t)) + eps)

and the state at the chunk's end is row ``L - 1`` of the same weights applied to the
keys. Forward saves each chunk's incoming state (``bounds``); the backward recomputes
each chunk from its incoming state and runs the adjoint of the above, with the state
gradients carried from the last chunk to the first. Gradients are taken in the parametrisation (unstabilised memory
``exp(m) C``, stabiliser ``m``): the stabiliser changes the outputs only through
``eps`` and the returned state, so its gradient ``gm_t = -eps (dh_t . h_t) / denom_t``
(plus the final state's) is routed along the arg-max path of each ``m_t`` (a key's
``i~``, a reset's ``log sigma(f~)``, or the carried ``m_in``), and the carried state's
gradient ``dC = exp(m) dL/d(exp(m) C)`` stays bounded like the state itself.

Gate arrays are packed per chunk in both orientations (``(L, 8)`` columns and
``(8, L)`` rows: ``i~, b, r, valid, g, reset-candidate flag``), so no transposes are
needed in the kernels. Padded steps (time rounded up to a chunk multiple) are masked
out as keys and have log-forget 0, so they leave the state untouched.

On TPU the forward and backward kernels walk the chunks of one (batch, head) row in
order (the chunk axis is "arbitrary", the state in VMEM scratch). On GPU the work is split
into a sequential state walk and chunk-parallel kernels (see the GPU section below):
the chunk-boundary states are computed first, then every chunk's outputs (and, backward,
its gradients) in parallel, as in the chunkwise kernels of ``mlstm_kernels``.

Block sizes (per grid cell / program):

==================  ===========================  ==========================================
array               TPU block (Mosaic)           GPU (Triton)
==================  ===========================  ==========================================
q, k / v, h         (L, d_qk) / (L, d_v)         per-chunk programs (row, d_v block, chunk):
                                                 (L, d_qk) / (L, d_v / nb); state walk
                                                 (row, d_qk tile, d_v tile): whole sequence,
                                                 (L, tile) per step
gates               (L, 8) and (8, L)            (L, 8) and (8, L) per chunk
state C / n / m     (d_qk, d_v) / (1, d_qk) /    walk carry: (tile, tile) / (1, tile);
                    (1, 1) f32 VMEM scratch      saved per chunk in the matmul dtype
chunk bounds        (d_qk, d_v) per chunk        (d_qk, d_v / nb) per per-chunk program
==================  ===========================  ==========================================

On GPU the columns of C are independent given q, k and the gates, so ``nb`` per-chunk
programs (:func:`value_blocks`, ``GPU_OPTIONS["block_v"]``) share one chunk: each
recomputes the (L, L) weights for its slice of value columns. The default ("fused")
backward is linear in the cotangents, so each takes its columns of dh and dC (block 0
also dn and dm) and the programs' dq, dk and gate partials are summed. The "split"
backward (``GPU_OPTIONS["bwd"]``) instead gives each (row, key block, chunk) one program
that loops over the value blocks for dq, dk and the gates, and each (row, value block,
chunk) one for dv.

``L`` is ``chunk_size`` (rounded to a multiple of 8 on TPU, a power of two >= 16 on
GPU, and never more than the padded length). TPU grid: (batch*heads "parallel",
chunks "arbitrary"); the tiling rule (last two block dims multiples of (8, 128) or the
full dims) holds for any ``d_qk, d_v`` since those blocks span the full feature dims
and the gate tiles are full (L, 8) / (8, L) blocks. On real TPUs use ``L`` = 64 or 128
and ``d_qk, d_v`` multiples of 128 (the MXU tile); VMEM per cell is about
``4 (L d_qk + L d_v + L^2 + 2 d_qk d_v)`` bytes plus double buffers. On GPU
``d_qk, d_v`` are zero-padded to powers of two >= 16 (Triton's ``tl.dot``; on Hopper
it lowers to wgmma), the float32 matmuls use IEEE precision (no TF32).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG = -jnp.inf
F32 = jnp.float32
GATE_ROWS = 8  # i~, b, r, valid, g, flag, 0, 0


def _mm(a, b, dims, mm_dtype):
    prec = lax.Precision.HIGHEST if mm_dtype == F32 else None
    return lax.dot_general(a.astype(mm_dtype), b.astype(mm_dtype), (dims, ((), ())), precision=prec,
                           preferred_element_type=F32)


def _dot(a, b, mm):  # a @ b
    return _mm(a, b, ((1,), (0,)), mm)


def _dot_nt(a, b, mm):  # a @ b.T
    return _mm(a, b, ((1,), (1,)), mm)


def _dot_tn(a, b, mm):  # a.T @ b
    return _mm(a, b, ((0,), (0,)), mm)


class Gates(NamedTuple):
    """Per-step gate quantities of one chunk, as columns (L, 1) or rows (1, L)."""

    i: jax.Array
    b: jax.Array
    r: jax.Array
    ok: jax.Array
    g: jax.Array
    fl: jax.Array


class Chunk(NamedTuple):
    """The recomputable per-chunk weights (see the module docstring)."""

    mask: jax.Array  # (L, L) bool
    log_g: jax.Array  # (L, L) stabiliser candidates
    intra: jax.Array  # (L, 1) max over keys
    log_a: jax.Array  # (L, 1) carried-state log weight (before m)
    m: jax.Array  # (L, 1)
    d: jax.Array  # (L, L)
    w: jax.Array  # (L, 1)
    c: jax.Array  # (L, 1) key weights into the chunk-end state
    w_a: jax.Array  # (1, 1) carried-state weight into the chunk-end state
    m_end: jax.Array  # (1, 1)


def _weights(gc: Gates, gr: Gates, m_in, L: int) -> Chunk:
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    mask = (col <= row) & (gc.r == gr.r) & (gr.ok > 0)
    decay = gc.b - gr.b
    log_d = jnp.where(mask, decay + gr.i, NEG)
    log_g = jnp.where(mask, decay + gr.g, NEG)
    intra = jnp.max(log_g, axis=1, keepdims=True)
    log_a = jnp.where(gc.r == 0, gc.b + m_in, NEG)
    m = jnp.maximum(log_a, intra)
    d = jnp.exp(log_d - m)
    w = jnp.exp(log_a - m)
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    b_end = jnp.sum(jnp.where(last, gc.b, 0.0), axis=0, keepdims=True)
    r_end = jnp.sum(jnp.where(last, gc.r, 0.0), axis=0, keepdims=True)
    m_loc = jnp.max(jnp.where(last, intra, NEG), axis=0, keepdims=True)
    log_a_end = jnp.where(r_end == 0, b_end + m_in, NEG)
    m_end = jnp.maximum(log_a_end, m_loc)
    c = jnp.exp(jnp.where((gc.r == r_end) & (gc.ok > 0), b_end - gc.b + gc.i, NEG) - m_end)
    return Chunk(mask, log_g, intra, log_a, m, d, w, c, jnp.exp(log_a_end - m_end), m_end)


def _col_to_row(x, L):
    eye = lax.broadcasted_iota(jnp.int32, (L, L), 0) == lax.broadcasted_iota(jnp.int32, (L, L), 1)
    return jnp.sum(jnp.where(eye, x, 0.0), axis=0, keepdims=True)


def _row_to_col(x, L):
    eye = lax.broadcasted_iota(jnp.int32, (L, L), 0) == lax.broadcasted_iota(jnp.int32, (L, L), 1)
    return jnp.sum(jnp.where(eye, x, 0.0), axis=1, keepdims=True)


def _outputs(q, k, v, C, n, x: Chunk, *, scale, eps, mm):
    qs = q.astype(F32) * scale
    s = _dot_nt(qs, k, mm) * x.d
    num = _dot(s, v, mm) + x.w * _dot(qs, C, mm)
    den = jnp.sum(s, axis=1, keepdims=True) + x.w * jnp.sum(qs * n, axis=1, keepdims=True)
    denom = jnp.maximum(jnp.abs(den), jnp.exp(-x.m)) + eps
    return qs, s, den, denom, num / denom


def fwd_chunk(q, k, v, gc, gr, C, n, m_in, *, scale, eps, mm):
    """One chunk forward: returns h (L, d_v) and the chunk-end state (C, n, m)."""
    L = q.shape[0]
    x = _weights(gc, gr, m_in, L)
    _, _, _, _, h = _outputs(q, k, v, C, n, x, scale=scale, eps=eps, mm=mm)
    kc = k.astype(F32) * x.c
    C_new = x.w_a * C + _dot_tn(kc, v, mm)
    n_new = x.w_a * n + jnp.sum(kc, axis=0, keepdims=True)
    return h, C_new, n_new, x.m_end


def bwd_chunk(q, k, v, dh, gc, gr, C, n, m_in, dC, dn, gm, *, scale, eps, mm, carry=True):
    """One chunk backward. ``(C, n, m_in)``: the chunk's incoming state; ``(dC, dn, gm)``:
    the gradient of the chunk-end state (see the module docstring). Returns dq, dk, dv,
    the gate gradients as rows (di (1, L), dlogf (1, L)) and, with ``carry``, the incoming
    state's gradient (dC, dn, gm)."""
    L = q.shape[0]
    x = _weights(gc, gr, m_in, L)
    qs, s, den, denom, h = _outputs(q, k, v, C, n, x, scale=scale, eps=eps, mm=mm)
    dh = dh.astype(F32)
    dnum = dh / denom
    dhh = jnp.sum(dh * h, axis=1, keepdims=True)
    dden = jnp.where(jnp.abs(den) > jnp.exp(-x.m), -dhh / denom * jnp.sign(den), 0.0)
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    gm_row = -eps * dhh / denom + jnp.where(last, gm, 0.0)  # dL/dm_t at fixed exp(m) C

    G = _dot_nt(dnum, v, mm) + dden  # dL/dS
    P = s * G  # dL/d(log weight) of each (t, s) term
    dG = x.d * G
    carry_q = x.w * (_dot_nt(dnum, C, mm) + dden * n)  # (L, d_qk)
    dqs = _dot(dG, k, mm) + carry_q
    R = jnp.sum(qs * carry_q, axis=1, keepdims=True)  # dL/d(log w_t)
    Y = _dot_nt(v, dC, mm) + dn  # (L, d_qk)
    dk = _dot_tn(dG, qs, mm) + x.c * Y
    dv = _dot_tn(s, dnum, mm) + x.c * _dot(k, dC, mm)
    E = x.c * jnp.sum(k.astype(F32) * Y, axis=1, keepdims=True)  # dL/d(log c_s)
    E_a = x.w_a * (jnp.sum(jnp.sum(C.astype(F32) * dC.astype(F32), axis=1, keepdims=True), axis=0, keepdims=True)
                   + jnp.sum(n * dn, axis=1, keepdims=True))

    # The stabiliser: m_t = b_t + (m_in or -b_a + g_a) along its arg-max.
    carry_wins = x.log_a >= x.intra
    onehot = x.mask & (x.log_g == x.intra) & jnp.logical_not(carry_wins)
    ties = jnp.maximum(jnp.sum(onehot.astype(F32), axis=1, keepdims=True), 1.0)
    Gm = jnp.where(onehot, gm_row / ties, 0.0)
    gm_in = jnp.sum(jnp.where(carry_wins, gm_row, 0.0), axis=0, keepdims=True)

    col_P = jnp.sum(P, axis=0, keepdims=True)
    col_Gm = jnp.sum(Gm, axis=0, keepdims=True)
    di = col_P + _col_to_row(E, L) + col_Gm * (1.0 - gr.fl)
    db = (jnp.sum(P, axis=1, keepdims=True) + R + gm_row - _row_to_col(col_P + col_Gm, L) - E
          + jnp.where(last, jnp.sum(E, axis=0, keepdims=True) + E_a, 0.0))
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    dlogf = jnp.sum(jnp.where(row >= col, db, 0.0), axis=0, keepdims=True) + col_Gm * gr.fl
    if not carry:
        return dqs * scale, dk, dv, di, dlogf

    qw = qs * x.w
    dC_in = x.w_a * dC + _dot_tn(qw, dnum, mm)
    dn_in = x.w_a * dn + jnp.sum(qw * dden, axis=0, keepdims=True)
    return dqs * scale, dk, dv, di, dlogf, dC_in, dn_in, gm_in


# ----------------------------------------------------------------------------- problem


def _round_up(x, m):
    return x + (-x) % m


def _pad_axis(x, axis, size, value=0.0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


class Problem(NamedTuple):
    """Padded, packed inputs of one call. Sequences are (batch*heads, time_p, d)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    gcol: jax.Array  # (BH, NC, L, 8)
    grow: jax.Array  # (BH, NC, 8, L)
    L: int
    n_chunks: int
    d_qk: int  # padded sizes
    d_v: int


def chunk_length(platform: str, chunk_size: int, time: int) -> int:
    if platform == "tpu":
        return min(_round_up(chunk_size, 8), _round_up(time, 8))
    p2 = lambda x: 1 << max(4, (x - 1).bit_length())  # noqa: E731
    return min(p2(chunk_size), p2(time))


def feature_size(platform: str, d: int) -> int:
    return d if platform == "tpu" else 1 << max(4, (d - 1).bit_length())


def make_problem(platform, q, k, v, i, f, keep, chunk_size) -> Problem:
    """q, k (B, H, T, d_qk); v (B, H, T, d_v); i, f (B, H, T) float32; keep (B, T) float
    (0 at a reset) or None."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    L = chunk_length(platform, chunk_size, T)
    NC = -(-T // L)
    Tp = NC * L
    dkp, dvp = feature_size(platform, dk), feature_size(platform, dv)

    def seq(x, d):
        return _pad_axis(_pad_axis(x.reshape(B * H, T, x.shape[-1]), 1, Tp), 2, d)

    logf = jax.nn.log_sigmoid(f).reshape(B * H, T)
    ig = i.reshape(B * H, T)
    reset = jnp.zeros((B * H, T), F32) if keep is None else jnp.repeat(1.0 - keep.astype(F32), H, axis=0)
    g = jnp.where(reset > 0, jnp.maximum(ig, logf), ig)
    flag = jnp.where((reset > 0) & (logf > ig), 1.0, 0.0)
    ok = jnp.ones((B * H, T), F32)
    rows = [_pad_axis(a, 1, Tp).reshape(B * H, NC, L) for a in (ig, logf, reset, ok, g, flag)]
    ig, logf, reset, ok, g, flag = rows
    b = jnp.cumsum(logf, axis=-1)
    r = jnp.cumsum(reset, axis=-1)
    zero = jnp.zeros_like(b)
    grow = jnp.stack([ig, b, r, ok, g, flag, zero, zero], axis=2)  # (BH, NC, 8, L)
    return Problem(seq(q, dkp), seq(k, dkp), seq(v, dvp), jnp.swapaxes(grow, 2, 3), grow, L, NC, dkp, dvp)


def _gates_from_tiles(gc, gr):
    """Gates from value tiles (L, 8) and (8, L)."""
    return (Gates(*(gc[:, j : j + 1] for j in range(6))), Gates(*(gr[j : j + 1, :] for j in range(6))))


def _gates_from_refs(gc_r, gr_r):
    """Gates read from (L, 8) and (8, L) refs one column / row at a time (the Triton
    lowering has no ``slice`` of a loaded value, only of a ref)."""
    return (Gates(*(gc_r[:, j : j + 1] for j in range(6))), Gates(*(gr_r[j : j + 1, :] for j in range(6))))


def _mm_dtype(dtype):
    return dtype if jnp.finfo(dtype).bits < 32 else F32


# ----------------------------------------------------------------------------- TPU


def _tpu_fwd_kernel(q_r, k_r, v_r, gc_r, gr_r, C0_r, n0_r, m0_r, h_r, CT_r, nT_r, mT_r, *rest, scale, eps, mm, save):
    *bounds, C_s, n_s, m_s = rest

    @pl.when(pl.program_id(1) == 0)
    def _():
        C_s[...], n_s[...], m_s[...] = C0_r[...], n0_r[...], m0_r[...]

    C, n, m = C_s[...], n_s[...], m_s[...]
    if save:
        bounds[0][...], bounds[1][...], bounds[2][...] = C, n, m
    gc, gr = _gates_from_tiles(gc_r[...], gr_r[...])
    h, C, n, m = fwd_chunk(q_r[...], k_r[...], v_r[...], gc, gr, C, n, m, scale=scale, eps=eps, mm=mm)
    h_r[...] = h.astype(h_r.dtype)
    C_s[...], n_s[...], m_s[...] = C, n, m
    CT_r[...], nT_r[...], mT_r[...] = C, n, m


def _tpu_bwd_kernel(q_r, k_r, v_r, dh_r, gc_r, gr_r, Cb_r, nb_r, mb_r, dCT_r, dnT_r, gmT_r,
                    dq_r, dk_r, dv_r, dg_r, dC0_r, dn0_r, gm0_r, dC_s, dn_s, gm_s, *, scale, eps, mm):
    @pl.when(pl.program_id(1) == 0)
    def _():
        dC_s[...], dn_s[...], gm_s[...] = dCT_r[...], dnT_r[...], gmT_r[...]

    gc, gr = _gates_from_tiles(gc_r[...], gr_r[...])
    dq, dk, dv, di, dlogf, dC, dn, gm = bwd_chunk(
        q_r[...], k_r[...], v_r[...], dh_r[...], gc, gr, Cb_r[...], nb_r[...], mb_r[...], dC_s[...], dn_s[...],
        gm_s[...], scale=scale, eps=eps, mm=mm)
    dq_r[...], dk_r[...], dv_r[...] = dq.astype(dq_r.dtype), dk.astype(dk_r.dtype), dv.astype(dv_r.dtype)
    dg_r[...] = jnp.concatenate([di, dlogf, jnp.zeros((GATE_ROWS - 2, di.shape[1]), F32)], axis=0)
    dC_s[...], dn_s[...], gm_s[...] = dC, dn, gm
    dC0_r[...], dn0_r[...], gm0_r[...] = dC, dn, gm


def _tpu_specs(p: Problem, reverse: bool):
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


def _tpu_forward(p: Problem, state, out_dtype, *, scale, eps, save, interpret):
    from jax.experimental.pallas import tpu as pltpu

    BH, sp = p.q.shape[0], _tpu_specs(p, False)
    shapes = [jax.ShapeDtypeStruct((BH, p.n_chunks * p.L, p.d_v), out_dtype)] + _state_shapes(BH, p.d_qk, p.d_v)
    out_specs = [sp["v"], sp["C"], sp["n"], sp["m"]]
    if save:
        shapes += _state_shapes(BH, p.d_qk, p.d_v, (p.n_chunks,))
        out_specs += [sp["Cb"], sp["nb"], sp["mb"]]
    return pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, scale=scale, eps=eps, mm=_mm_dtype(p.q.dtype), save=save),
        grid=(BH, p.n_chunks),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["C"], sp["n"], sp["m"]],
        out_specs=out_specs, out_shape=shapes,
        scratch_shapes=[pltpu.VMEM((p.d_qk, p.d_v), F32), pltpu.VMEM((1, p.d_qk), F32), pltpu.VMEM((1, 1), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(p.q, p.k, p.v, p.gcol, p.grow, *state)


def _tpu_backward(p: Problem, dh, bounds, dstate, *, scale, eps, interpret):
    from jax.experimental.pallas import tpu as pltpu

    BH, sp = p.q.shape[0], _tpu_specs(p, True)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (p.q, p.k, p.v)]
    shapes += [jax.ShapeDtypeStruct((BH, p.n_chunks, GATE_ROWS, p.L), F32)] + _state_shapes(BH, p.d_qk, p.d_v)
    return pl.pallas_call(
        functools.partial(_tpu_bwd_kernel, scale=scale, eps=eps, mm=_mm_dtype(p.q.dtype)),
        grid=(BH, p.n_chunks),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["v"], sp["gc"], sp["gr"], sp["Cb"], sp["nb"], sp["mb"],
                  sp["C"], sp["n"], sp["m"]],
        out_specs=[sp["qk"], sp["qk"], sp["v"], sp["gr"], sp["C"], sp["n"], sp["m"]],
        out_shape=shapes,
        scratch_shapes=[pltpu.VMEM((p.d_qk, p.d_v), F32), pltpu.VMEM((1, p.d_qk), F32), pltpu.VMEM((1, 1), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(p.q, p.k, p.v, dh, p.gcol, p.grow, *bounds, *dstate)


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
# 3. the outputs (Pallas, one program per (row, d_v block, chunk), all in parallel): the
#    intra-chunk matmuls plus the incoming state's term, and per-step stabiliser m_t,
#    denominator sum den_t, carried-state weight w_t and arg-max flag, kept for the backward.
#
# The backward is the same in reverse: the adjoint walk dC_in = w_a dC_end + (e * Q)^T dH,
# e_t = s w_t / denom_t (and dn with s w_t dden_t) saves each chunk's end-state gradient;
# the stabiliser's gradient (an eps-sized term along each m_t's arg-max) is a scalar affine
# recurrence over chunks (XLA associative scan); then one program per (row, d_v block,
# chunk) recomputes its chunk and writes dq, dk, dv and the gate gradients, in parallel.

# num_warps / num_stages of the per-chunk kernels; block_v: value columns per per-chunk
# program (None: the largest power of two <= d_v with d_qk * block_v <= 8192); state_block:
# the (d_qk, d_v) tile of one state-walk program (state_warps warps).
# bwd: "fused" -- one program per (row, d_v block, chunk) for all gradients, partials of dq,
# dk and the gates summed afterwards (measured, see benchmarks/RESULTS.md); "split" -- one
# program per (row, d_qk block of block_k, chunk) for dq, dk and the gates, looping over the
# value blocks (nothing recomputed per value block, no dq/dk partials), and one per (row,
# d_v block, chunk) for dv (not yet timed on a GPU).
GPU_OPTIONS = {"num_warps": 4, "num_stages": 1, "block_v": None, "state_block": 64, "state_warps": 4, "bwd": "fused",
               "block_k": 64}
COEF_COLS = 4  # state-walk coefficients per step: key/query weight, w_a (chunk), n weight, 0


def value_blocks(d_qk: int, d_v: int) -> int:
    """How many per-chunk programs split one row's (padded, power-of-two) ``d_v`` columns."""
    bv = GPU_OPTIONS["block_v"] or max(16, 8192 // d_qk)
    return max(1, d_v // min(d_v, 1 << (max(16, bv).bit_length() - 1)))


def _gpu_params(interpret, warps_key="num_warps"):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=GPU_OPTIONS[warps_key], num_stages=GPU_OPTIONS["num_stages"])


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
    bk, bv = min(dk, GPU_OPTIONS["state_block"]), min(dv, GPU_OPTIONS["state_block"])
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
        compiler_params=_gpu_params(interpret, "state_warps"), interpret=interpret,
    )(x, y, coefs, s0, n0)


STAT_ROWS = 4  # per-step forward statistics kept for the backward: m_t, den_t, w_t, carry wins


def _gpu_out_kernel(q_r, k_r, v_r, gc_r, gr_r, C_r, n_r, m_r, h_r, st_r, *, scale, eps, mm):
    L = q_r.shape[0]
    gc, gr = _gates_from_refs(gc_r, gr_r)
    x = _weights(gc, gr, m_r[...], L)
    # C stays in the matmul dtype it was saved in (it is only a matmul operand here)
    _, _, den, _, h = _outputs(q_r[...], k_r[...], v_r[...], C_r[...], n_r[...], x, scale=scale, eps=eps, mm=mm)
    h_r[...] = h.astype(h_r.dtype)
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
    """A chunk's weights, scaled queries, masked scores and normaliser (see _outputs)."""
    L = q_r.shape[0]
    x = _weights(gc, gr, m_in, L)
    qs = q_r[...].astype(F32) * scale
    s = _dot_nt(qs, k_r[...], mm) * x.d
    den = jnp.sum(s, axis=1, keepdims=True) + x.w * jnp.sum(qs * n_r[...], axis=1, keepdims=True)
    return x, qs, s, den, jnp.maximum(jnp.abs(den), jnp.exp(-x.m)) + eps


def _gpu_dqk_kernel(q_r, k_r, v_r, dh_r, gc_r, gr_r, C_r, n_r, m_r, dC_r, dn_r, gm_r, aux_r, dq_r, dk_r, dg_r, *,
                    nk, bk, nv, bv, scale, eps, mm):
    """dq, dk (columns kb*bk ...) and this block's share of the gate gradients for one chunk:
    bwd_chunk's algebra with the sums over d_v done in a loop over value blocks and the
    sums over d_qk split by key blocks (the d_qk-independent terms go to block 0)."""
    L = q_r.shape[0]
    kb = pl.program_id(0) % nk
    first = (kb == 0).astype(F32)
    cols = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    gc, gr = _gates_from_refs(gc_r, gr_r)
    x, qs, s, den, denom = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
    dhh = aux_r[:, 0:1]  # dh . h over all value columns
    dden = jnp.where(jnp.abs(den) > jnp.exp(-x.m), -dhh / denom * jnp.sign(den), 0.0)
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    gm_row = first * (-eps * dhh / denom + jnp.where(last, gm_r[...], 0.0))

    def over_values(j, acc):
        G, CQ, Y, Ea = acc
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        v, dnum = v_r[:, vc], dh_r[:, vc].astype(F32) / denom
        C, dC = C_r[cols, vc], dC_r[cols, vc]
        return (G + _dot_nt(dnum, v, mm), CQ + _dot_nt(dnum, C, mm), Y + _dot_nt(v, dC, mm),
                Ea + jnp.sum(jnp.sum(C.astype(F32) * dC.astype(F32), axis=1, keepdims=True), axis=0, keepdims=True))

    zeros = (jnp.zeros((L, L), F32), jnp.zeros((L, bk), F32), jnp.zeros((L, bk), F32), jnp.zeros((1, 1), F32))
    G, CQ, Y, Ea = lax.fori_loop(0, nv, over_values, zeros)
    G = G + dden
    P = s * G
    dG = x.d * G
    q_kb, k_kb = q_r[:, cols].astype(F32) * scale, k_r[:, cols]
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


def _gpu_dv_kernel(q_r, k_r, dh_r, gc_r, gr_r, n_r, m_r, dC_r, dv_r, *, scale, eps, mm):
    """dv for one chunk's block of value columns: S^T dnum + c * (k dC)."""
    gc, gr = _gates_from_refs(gc_r, gr_r)
    x, _, s, _, denom = _core(q_r, k_r, n_r, gc, gr, m_r[...], scale=scale, eps=eps, mm=mm)
    dnum = dh_r[...].astype(F32) / denom
    dv_r[...] = (_dot_tn(s, dnum, mm) + x.c * _dot(k_r[...], dC_r[...], mm)).astype(dv_r.dtype)


def _gpu_grads_split(p: Problem, dh, Cs, ns, m_in4, dCs, dns, gm_end, dhh, *, scale, eps, interpret):
    """The "split" backward's per-chunk kernels (see GPU_OPTIONS): (dq, dk, dv, dg)."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    mm = _mm_dtype(p.q.dtype)
    bk = min(p.d_qk, GPU_OPTIONS["block_k"])
    nk = p.d_qk // bk
    nb = value_blocks(p.d_qk, p.d_v)
    bv = p.d_v // nb
    whole = lambda *sh: pl.BlockSpec((None, *sh), lambda b, c: (b // nk, c) + (0,) * (len(sh) - 1))  # noqa: E731
    chunk = lambda *sh: pl.BlockSpec((None, None, *sh), lambda b, c: (b // nk, c) + (0,) * len(sh))  # noqa: E731
    kcols = pl.BlockSpec((None, L, bk), lambda b, c: (b // nk, c, b % nk))
    aux = jnp.pad(dhh[..., None], ((0, 0), (0, 0), (0, 0), (0, GATE_ROWS - 1)))  # (BH, NC, L, 8): dhh in column 0
    dq, dk, dg = pl.pallas_call(
        functools.partial(_gpu_dqk_kernel, nk=nk, bk=bk, nv=nb, bv=bv, scale=scale, eps=eps, mm=mm),
        grid=(BH * nk, NC),
        in_specs=[whole(L, p.d_qk), whole(L, p.d_qk), whole(L, p.d_v), whole(L, p.d_v), chunk(L, GATE_ROWS),
                  chunk(GATE_ROWS, L), chunk(p.d_qk, p.d_v), chunk(1, p.d_qk), chunk(1, 1), chunk(p.d_qk, p.d_v),
                  chunk(1, p.d_qk), chunk(1, 1), chunk(L, GATE_ROWS)],
        out_specs=[kcols, kcols, pl.BlockSpec((None, None, 2, L), lambda b, c: (b, c, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((BH, NC * L, p.d_qk), F32)] * 2 + [jax.ShapeDtypeStruct((BH * nk, NC, 2, L), F32)],
        compiler_params=_gpu_params(interpret), interpret=interpret,
    )(p.q, p.k, p.v, dh, p.gcol, p.grow, Cs, ns, m_in4, dCs, dns, gm_end, aux)
    sp = _chunk_specs(p, nb)
    dv = pl.pallas_call(
        functools.partial(_gpu_dv_kernel, scale=scale, eps=eps, mm=mm), grid=(BH * nb, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["n"], sp["m"], sp["C"]],
        out_specs=sp["v"], out_shape=jax.ShapeDtypeStruct(p.v.shape, p.v.dtype),
        compiler_params=_gpu_params(interpret), interpret=interpret,
    )(p.q, p.k, dh, p.gcol, p.grow, ns, m_in4, dCs)
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


def _gpu_forward(p: Problem, state, out_dtype, *, scale, eps, save, interpret):
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    mm = _mm_dtype(p.q.dtype)
    C0, n0, m0 = state
    m_in, m_T, w_a, c = chunk_scalars(p, m0[:, 0, 0])
    Cs, ns, C_T, n_T = _gpu_walk(p, p.k, p.v, _coefs(w_a, c, c), C0, n0, reverse=False, state_dtype=mm,
                                 interpret=interpret)
    nb = value_blocks(p.d_qk, p.d_v)
    sp = _chunk_specs(p, nb)
    m_in4 = m_in[:, :, None, None]
    h, stats = pl.pallas_call(
        functools.partial(_gpu_out_kernel, scale=scale, eps=eps, mm=mm), grid=(BH * nb, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["C"], sp["n"], sp["m"]],
        out_specs=[sp["v"], sp["st"]],  # stats: every d_v block writes the same values
        out_shape=[jax.ShapeDtypeStruct((BH, NC * L, p.d_v), out_dtype),
                   jax.ShapeDtypeStruct((BH, NC, STAT_ROWS, L), F32)],
        compiler_params=_gpu_params(interpret), interpret=interpret,
    )(p.q, p.k, p.v, p.gcol, p.grow, Cs, ns, m_in4)
    outs = [h, C_T, n_T, m_T.reshape(BH, 1, 1)]
    if save:
        outs += [Cs, ns, m_in4, w_a, stats, h]
    return outs


def _gpu_backward(p: Problem, dh, bounds, dstate, *, scale, eps, interpret):
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
    if GPU_OPTIONS["bwd"] == "split":
        dq, dk, dv, dg = _gpu_grads_split(p, dh, Cs, ns, m_in4, dCs, dns, gm_end[:, :, None, None], dhh, scale=scale,
                                          eps=eps, interpret=interpret)
        return dq, dk, dv, dg, dC0, dn0, gm_in[:, :1, None]
    if GPU_OPTIONS["bwd"] != "fused":
        raise ValueError(f"GPU_OPTIONS['bwd'] must be 'fused' or 'split', got {GPU_OPTIONS['bwd']!r}")
    nb = value_blocks(p.d_qk, p.d_v)
    sp = _chunk_specs(p, nb)
    dq, dk, dv, dg = pl.pallas_call(
        functools.partial(_gpu_grad_kernel, nb=nb, scale=scale, eps=eps, mm=mm), grid=(BH * nb, NC),
        in_specs=[sp["qk"], sp["qk"], sp["v"], sp["v"], sp["gc"], sp["gr"], sp["C"], sp["n"], sp["m"], sp["C"], sp["n"],
                  sp["m"]],
        out_specs=[sp["qk_p"], sp["qk_p"], sp["v"], sp["dg_p"]],
        out_shape=[jax.ShapeDtypeStruct((BH * nb, NC * L, p.d_qk), F32)] * 2
        + [jax.ShapeDtypeStruct(p.v.shape, p.v.dtype), jax.ShapeDtypeStruct((BH * nb, NC, 2, L), F32)],
        compiler_params=_gpu_params(interpret), interpret=interpret,
    )(p.q, p.k, p.v, dh, p.gcol, p.grow, Cs, ns, m_in4, dCs, dns, gm_end[:, :, None, None])
    total = lambda a: a.reshape(BH, nb, *a.shape[1:]).sum(axis=1)  # noqa: E731
    return total(dq), total(dk), dv, total(dg), dC0, dn0, gm_in[:, :1, None]


# ----------------------------------------------------------------------------- entry points


def _interp(platform, interpret):
    if interpret and platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return bool(interpret)


def _state_in(p: Problem, state):
    C, n, m = state
    BH = p.q.shape[0]
    C = _pad_axis(_pad_axis(C.astype(F32).reshape(BH, *C.shape[2:]), 1, p.d_qk), 2, p.d_v)
    n = _pad_axis(n.astype(F32).reshape(BH, 1, n.shape[-1]), 2, p.d_qk)
    return C, n, m.astype(F32).reshape(BH, 1, 1)


def _state_out(C, n, m, shape):
    B, H, dk, dv = shape
    return C[:, :dk, :dv].reshape(B, H, dk, dv), n[:, 0, :dk].reshape(B, H, dk), m.reshape(B, H)


def forward(platform, q, k, v, i, f, state, keep, *, chunk_size, eps, scale, save, interpret):
    """h (B, H, T, d_v), final (C, n, m) and, with ``save``, the chunk bounds."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    p = make_problem(platform, q, k, v, i, f, keep, chunk_size)
    run = _tpu_forward if platform == "tpu" else _gpu_forward
    outs = run(p, _state_in(p, state), q.dtype, scale=scale, eps=eps, save=save, interpret=_interp(platform, interpret))
    h = outs[0][:, :T, :dv].reshape(B, H, T, dv)
    return h, _state_out(*outs[1:4], (B, H, dk, dv)), (tuple(outs[4:]) if save else None)


def backward(platform, q, k, v, i, f, state, keep, final, bounds, dh, dfinal, *, chunk_size, eps, scale, interpret):
    """Gradients (dq, dk, dv, di, df, (dC0, dn0, dm0)) given the outputs' cotangents."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    p = make_problem(platform, q, k, v, i, f, keep, chunk_size)
    Tp = p.n_chunks * p.L
    dh = _pad_axis(_pad_axis(dh.reshape(B * H, T, dv), 1, Tp), 2, p.d_v).astype(q.dtype)
    gC, gn, gmT = (a.astype(F32) for a in dfinal)
    C_T, n_T, _ = final
    # d/dm_T at fixed exp(m_T) C_T: the returned (C, n) scale with exp(-m_T).
    gm = gmT - jnp.sum(gC * C_T, axis=(2, 3)) - jnp.sum(gn * n_T, axis=2)
    dstate = _state_in(p, (gC, gn, gm))
    run = _tpu_backward if platform == "tpu" else _gpu_backward
    dq, dk_, dv_, dg, dC, dn, dm = run(p, dh, bounds, dstate, scale=scale, eps=eps, interpret=_interp(platform, interpret))
    seq = lambda a, d: a[:, :T, :d].reshape(B, H, T, d)  # noqa: E731
    rows = dg.shape[2]
    dg = jnp.swapaxes(dg, 1, 2).reshape(B * H, rows, Tp)[:, :, :T].reshape(B, H, rows, T)
    di, dlogf = dg[:, :, 0], dg[:, :, 1]
    dC0, dn0, gm0 = _state_out(dC, dn, dm, (B, H, dk, dv))
    C0, n0, _ = state
    dm0 = gm0 + jnp.sum(dC0 * C0, axis=(2, 3)) + jnp.sum(dn0 * n0, axis=2)
    return seq(dq, dk), seq(dk_, dk), seq(dv_, dv), di, dlogf * jax.nn.sigmoid(-f), (dC0, dn0, dm0)
