"""The layout and in-kernel math of the matrix-state ops' Pallas kernels
(``gated_linear_attention`` and ``delta_rule``), shared by the GPU kernels
(:mod:`mnemax.kernels.chunked_gpu` and the ops' ``gpu*.py``) and the TPU kernels
(:mod:`mnemax.kernels.chunked_tpu` and the ops' ``tpu*.py``); platform-neutral: nothing here
names Triton or Mosaic.

Layouts: rows are batch x heads (``BH``), time is padded to ``NC`` chunks of ``L`` steps and
the features to the widths the platform's matmuls take (:func:`problem`). Per-step gate
quantities travel as (BH, NC, L, 8) columns and (BH, NC, 8, L) rows (a kernel cannot
transpose a vector): ``G`` (the cumulative log decay since the chunk's start), the segment
index (resets cut segments) and ``beta`` (1 for linear attention). In-kernel matmuls follow a
:class:`Matmul` policy: operands rounded to its dtype, float32 accumulation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .chunked import pad_time

F32 = jnp.float32
GATE_COLS = 8  # G (cumulative log decay in the chunk), segment index, beta, 0...
ROW_G, ROW_SEG, ROW_BETA = 0, 1, 2


# ----------------------------------------------------------------------------- layout


class Problem(NamedTuple):
    """An op's inputs in the kernels' layout (see the module docstring). With grouped query
    and key heads (``rep`` > 1: each q/k head serves ``rep`` consecutive value heads, as
    Mamba-2's groups of B and C do) ``q`` and ``k`` have B * heads / rep rows, read by
    :func:`qk_row`, and every other array B * heads."""

    q: jax.Array  # (BH / rep, Tp, dk)
    k: jax.Array  # (BH / rep, Tp, dk)
    v: jax.Array  # (BH, Tp, dv)
    gcol: jax.Array  # (BH, NC, L, 8) float32
    grow: jax.Array  # (BH, NC, 8, L) float32
    L: int
    n_chunks: int
    d_k: int
    d_v: int
    heads: int = 1  # value heads per batch row
    rep: int = 1  # value heads per q/k head

    @property
    def rows(self) -> int:
        """BH: the rows of every per-head array (the kernels' grid)."""
        return self.v.shape[0]


def qk_row(p: Problem):
    """The row of ``q`` and ``k`` that value row ``bh`` (batch-major, heads within) reads: a
    function of the (traced) grid index, for the kernels' index maps."""
    if p.rep == 1:
        return lambda bh: bh
    return lambda bh: (bh // p.heads) * (p.heads // p.rep) + (bh % p.heads) // p.rep


def group_sum(x, rep: int):
    """(B, H, ...) per-head gradients of grouped q or k -> (B, H / rep, ...): each q/k head's
    gradient is the sum over the value heads it serves."""
    if rep == 1:
        return x
    B, H = x.shape[:2]
    return x.reshape(B, H // rep, rep, *x.shape[2:]).sum(axis=2)


def pow2(x: int, low: int = 16) -> int:
    """The smallest power of two >= max(x, low)."""
    return 1 << max(low.bit_length() - 1, (x - 1).bit_length())


def pad_axis(x, axis: int, size: int):
    """``x`` zero-padded along ``axis`` to ``size``."""
    return pad_time(x, size, axis)


def problem(q, k, v, g, beta, resets, L: int, d_k: int, d_v: int) -> Problem:
    """q, k (B, H / rep, T, d_k); v (B, H, T, d_v); g None or (B, H, T); beta None or (B, H,
    T); resets None or (B, T) bool, in chunks of ``L`` with features zero-padded to ``d_k``,
    ``d_v``. Padded steps have zero q, k, v, beta and g: they change nothing. Only the kernels
    that read q and k through :func:`qk_row` take grouped heads (rep > 1)."""
    B, Hq, T, _ = q.shape
    H = v.shape[1]
    NC = -(-T // L)
    Tp = NC * L

    def seq(x, d):
        return pad_axis(pad_axis(x.reshape(B * x.shape[1], T, x.shape[-1]), 1, Tp), 2, d)

    def per_step(x):  # (B*H, T) -> (BH, NC, L) float32
        return pad_axis(x.astype(F32).reshape(B * H, T), 1, Tp).reshape(B * H, NC, L)

    G = jnp.zeros((B * H, NC, L), F32) if g is None else jnp.cumsum(per_step(g), axis=-1)
    if resets is None:
        seg = jnp.zeros((B * H, NC, L), F32)
    else:
        r = pad_axis(resets.astype(F32), 1, Tp).reshape(B, NC, L)
        seg = jnp.repeat(jnp.cumsum(r, axis=-1), H, axis=0)
    b = per_step(jnp.ones((B, H, T), F32) if beta is None else beta)
    zero = jnp.zeros_like(G)
    grow = jnp.stack([G, seg, b] + [zero] * (GATE_COLS - 3), axis=2)  # (BH, NC, 8, L)
    return Problem(seq(q, d_k), seq(k, d_k), seq(v, d_v), jnp.swapaxes(grow, 2, 3), grow, L, NC, d_k, d_v, H, H // Hq)


def state_in(p: Problem, state):
    """(B, H, d_k, d_v) -> (BH, d_k padded, d_v padded) float32."""
    BH = p.rows
    return pad_axis(pad_axis(state.astype(F32).reshape(BH, *state.shape[2:]), 1, p.d_k), 2, p.d_v)


def state_out(S, shape):
    B, H, dk, dv = shape
    return S[:, :dk, :dv].reshape(B, H, dk, dv)


def seq_out(x, shape):
    """(BH, Tp, d padded) -> (B, H, T, d)."""
    B, H, T, d = shape
    return x[:, :T, :d].reshape(B, H, T, d)


def step_out(x, shape):
    """(BH, NC, L) -> (B, H, T)."""
    B, H, T = shape
    return x.reshape(B * H, -1)[:, :T].reshape(B, H, T)


def state_in_t(p: Problem, state):
    """(B, H, d_k, d_v) -> (BH, d_v padded, d_k padded) float32: the per-channel kernels'
    transposed state (each per-channel factor a (1, d_k) row)."""
    return jnp.swapaxes(state_in(p, state), 1, 2)


def state_out_t(S, shape):
    """(BH, d_v padded, d_k padded) -> (B, H, d_k, d_v)."""
    return state_out(jnp.swapaxes(S, 1, 2), shape)


def decay_grad(dG):
    """dg from dG (BH, NC, L), or (BH, NC, L, d_k) per key channel: ``G_t = sum_{u <= t} g_u``
    inside a chunk, so ``dg_u = sum_{t >= u} dG_t`` (a reverse cumulative sum per chunk)."""
    return jnp.flip(jnp.cumsum(jnp.flip(dG, 2), axis=2), 2)


def mm_dtype(dtype):
    """The matmul operand dtype: 16-bit inputs stay 16-bit, everything else float32."""
    return dtype if jnp.finfo(dtype).bits < 32 else F32


# ----------------------------------------------------------------------------- in-kernel math


class Matmul(NamedTuple):
    """How a kernel's matmuls run: operands rounded to ``dtype`` (float32 accumulation), and
    float32 operands at ``precision``; with ``tf32_operands`` (interpret mode's stand-in for
    one-pass TF32, which the CPU lacks) float32 operands are first rounded to TF32's 10-bit
    mantissa."""

    dtype: object
    precision: object
    tf32_operands: bool = False


def _mm(a, b, dims, mm: Matmul):
    prec = mm.precision if mm.dtype == F32 else None
    a, b = a.astype(mm.dtype), b.astype(mm.dtype)
    if mm.tf32_operands:
        a, b = lax.reduce_precision(a, 8, 10), lax.reduce_precision(b, 8, 10)
    return lax.dot_general(a, b, (dims, ((), ())), precision=prec, preferred_element_type=F32)


def split_dot(a, b, dims, mm: Matmul):
    """A float32 ``a`` times ``b`` already exact in the operand dtype (16-bit inputs): ``a`` as
    the sum of two 16-bit halves, two 16-bit matmuls. Float32 operands take ``mm``'s policy."""
    if mm.dtype == F32:
        return _mm(a, b, dims, mm)
    hi = a.astype(mm.dtype)
    lo = (a - hi.astype(F32)).astype(mm.dtype)
    return _mm(hi, b, dims, mm) + _mm(lo, b, dims, mm)


def dot(a, b, mm: Matmul):  # a @ b
    return _mm(a, b, ((1,), (0,)), mm)


def dot_nt(a, b, mm: Matmul):  # a @ b.T
    return _mm(a, b, ((1,), (1,)), mm)


def dot_tn(a, b, mm: Matmul):  # a.T @ b
    return _mm(a, b, ((0,), (0,)), mm)


def col_to_row(x, L):
    """(L, 1) -> (1, L) without a transpose (a masked sum)."""
    eye = lax.broadcasted_iota(jnp.int32, (L, L), 0) == lax.broadcasted_iota(jnp.int32, (L, L), 1)
    return jnp.sum(jnp.where(eye, x, 0.0), axis=0, keepdims=True)


def row_to_col(x, L):
    """(1, L) -> (L, 1) without a transpose (a masked sum)."""
    eye = lax.broadcasted_iota(jnp.int32, (L, L), 0) == lax.broadcasted_iota(jnp.int32, (L, L), 1)
    return jnp.sum(jnp.where(eye, x, 0.0), axis=1, keepdims=True)


class Weights(NamedTuple):
    """A chunk's decay weights (columns are (L, 1), the rest as noted)."""

    G: jax.Array  # cumulative log decay
    beta: jax.Array
    q_in: jax.Array  # exp(G_t) where the incoming state reaches t (no reset yet), else 0
    k_out: jax.Array  # exp(G_L - G_s) where s is in the last segment, else 0
    a: jax.Array  # (1, 1) the incoming state's decay over the chunk (0 after a reset)


def weights(G, seg, beta, L: int) -> Weights:
    """:class:`Weights` from the gate columns ``G``, ``seg``, ``beta`` (L, 1)."""
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    G_L = jnp.sum(jnp.where(last, G, 0.0), axis=0, keepdims=True)
    seg_L = jnp.sum(jnp.where(last, seg, 0.0), axis=0, keepdims=True)
    q_in = jnp.where(seg == 0.0, jnp.exp(G), 0.0)
    k_out = jnp.where(seg == seg_L, jnp.exp(G_L - G), 0.0)
    a = jnp.where(seg_L == 0.0, jnp.exp(G_L), 0.0)
    return Weights(G, beta, q_in, k_out, a)


def decay_mask(gc_r, gr_r, L: int, *, strict: bool, h=None):
    """(L, L) ``exp(G_t - G_s)`` for s <= t (s < t with ``strict``) in one segment, else 0,
    from the (L, 8) gate columns and (8, L) rows, or with ``h`` from head ``h`` of (heads, L,
    8) and (heads, 8, L) refs (one indexing each, as :func:`chunk_weights`)."""
    if h is None:
        col = lambda j: gc_r[:, j:j + 1]  # noqa: E731
        row_of = lambda j: gr_r[j:j + 1, :]  # noqa: E731
    else:
        col = lambda j: gc_r[h, :, j:j + 1]  # noqa: E731
        row_of = lambda j: gr_r[h, j:j + 1, :]  # noqa: E731
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col_i = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    causal = (col_i < row) if strict else (col_i <= row)
    mask = causal & (col(ROW_SEG) == row_of(ROW_SEG))
    return jnp.exp(jnp.where(mask, col(ROW_G) - row_of(ROW_G), -jnp.inf))


def chunk_weights(gc_r, L: int, c=None) -> Weights:
    """:class:`Weights` of the chunk whose gate columns are the (L, 8) ref ``gc_r`` (or chunk
    ``c`` of the (NC, L, 8) ref ``gc_r``: one indexing, as the Triton lowering takes no
    index of an indexed ref)."""
    if c is None:
        col = lambda j: gc_r[:, j:j + 1]  # noqa: E731
    else:
        col = lambda j: gc_r[c, :, j:j + 1]  # noqa: E731
    return weights(col(ROW_G), col(ROW_SEG), col(ROW_BETA), L)
