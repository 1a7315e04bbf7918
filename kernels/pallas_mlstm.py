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
into a sequential state walk and chunk-parallel kernels (:mod:`.pallas_mlstm_gpu`):
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
recomputes the (L, L) weights for its slice of value columns (``GPU_OPTIONS["fwd"] =
"loop"``: one program per chunk loops over the slices instead). The default ("split")
backward gives each (row, key block, chunk) one program that loops over the value
blocks for dq, dk and the gates, and dv its own kernel (or the same loop, ``"dv"``).
The "fused" backward (``GPU_OPTIONS["bwd"]``) is linear in the cotangents, so each
value-block program takes its columns of dh and dC (block 0 also dn and dm) and the
programs' dq, dk and gate partials are summed (3.4x slower at d_qk 256 / d_v 512 on an
H200: benchmarks/RESULTS.md).

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


def _scores(q, k, n, x: Chunk, *, scale, eps, mm):
    """Scaled queries, masked scores S, the normaliser sum ``den`` and ``denom``."""
    qs = q.astype(F32) * scale
    s = _dot_nt(qs, k, mm) * x.d
    den = jnp.sum(s, axis=1, keepdims=True) + x.w * jnp.sum(qs * n, axis=1, keepdims=True)
    return qs, s, den, jnp.maximum(jnp.abs(den), jnp.exp(-x.m)) + eps


def _outputs(q, k, v, C, n, x: Chunk, *, scale, eps, mm):
    qs, s, den, denom = _scores(q, k, n, x, scale=scale, eps=eps, mm=mm)
    num = _dot(s, v, mm) + x.w * _dot(qs, C, mm)
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


# ----------------------------------------------------------------------------- entry points


def _gpu():
    """The GPU kernels (:mod:`mnemax.kernels.pallas_mlstm_gpu`, which imports this module)."""
    from . import pallas_mlstm_gpu

    return pallas_mlstm_gpu


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
    run = _tpu_forward if platform == "tpu" else _gpu().forward
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
    run = _tpu_backward if platform == "tpu" else _gpu().backward
    dq, dk_, dv_, dg, dC, dn, dm = run(p, dh, bounds, dstate, scale=scale, eps=eps, interpret=_interp(platform, interpret))
    seq = lambda a, d: a[:, :T, :d].reshape(B, H, T, d)  # noqa: E731
    rows = dg.shape[2]
    dg = jnp.swapaxes(dg, 1, 2).reshape(B * H, rows, Tp)[:, :, :T].reshape(B, H, rows, T)
    di, dlogf = dg[:, :, 0], dg[:, :, 1]
    dC0, dn0, gm0 = _state_out(dC, dn, dm, (B, H, dk, dv))
    C0, n0, _ = state
    dm0 = gm0 + jnp.sum(dC0 * C0, axis=(2, 3)) + jnp.sum(dn0 * n0, axis=2)
    return seq(dq, dk), seq(dk_, dk), seq(dv_, dv), di, dlogf * jax.nn.sigmoid(-f), (dC0, dn0, dm0)
