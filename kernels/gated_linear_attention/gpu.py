"""Pallas GPU (Triton) kernels for ``gated_linear_attention`` with one log decay per key
channel (GLA's gate; fla's ``chunk_gla``): the same split as the per-head kernels of
:mod:`mnemax.kernels.chunked_gpu` (a sequential state walk saving each chunk's incoming
state, then one program per chunk; an adjoint walk, then one gradient program per chunk),
with the decay a row of ``d_k`` factors.

With ``G`` (L, d_k) the cumulative log decay since the chunk's start (per channel; resets
cut the chunk into segments, :mod:`mnemax.kernels.chunked`), ``[fresh]`` the steps the
incoming state reaches (before any reset in the chunk), ``[last]`` the chunk's last segment
and ``[carries]`` a chunk without a reset, per chunk::

    A_ts   = scale sum_d q_td k_sd exp(G_td - G_sd)              s <= t, one segment
    o      = (scale q * exp(G) [fresh]) S_in + A V
    S_out  = Diag(exp(G_L) [carries]) S_in + (k * exp(G_L - G) [last])^T V

``A`` is formed by :func:`intra` in one of two exact forms, per chunk and key block: where
the cumulative decay there spans at most ``ChunkedConfig.span_limit`` nats (60), one
matmul ``(q exp(G - c)) (k exp(c - G))^T`` with ``c`` the middle of each channel's range, so
every factor stays within ``exp(+-30)``; beyond it, in sub-chunks of ``c = 16`` steps: a
diagonal sub-block exactly, one key step ``s`` at a time (its ``k_s`` and ``G_s`` rows read
from the refs), the sub-chunks before row sub-chunk ``i`` as one matmul factored around
``r``, the last step before it: ``(q_t exp(G_t - G_r)) . (k_s exp(G_r - G_s))``, every
exponent <= 0, so no gate, however strong, overflows. Where every chunk of a call is within
the limit (``ChunkedConfig.form_per_call``; one ``lax.cond`` outside the kernels,
:func:`by_span`), kernels holding only the factored form run instead: the same values with
fewer registers. The backward, with ``dA = dO V^T`` (masked as A)::

    dq     = scale exp(G) [fresh] (.) dO S_in^T + sum_s scale dA_ts k_s (.) exp(G_t - G_s)
    dk     = exp(G_L - G) [last] (.) V dS_out^T + sum_t scale dA_ts q_t (.) exp(G_t - G_s)
    dv     = A^T dO + (k * exp(G_L - G) [last]) dS_out
    dS_in  = Diag(exp(G_L) [carries]) dS_out + (scale q * exp(G) [fresh])^T dO
    dG     = q (.) dq - k (.) dk + [t = L] (sum_s (k (.) dk_out)_s + exp(G_L) [carries] (.) rowsum(S_in (.) dS_out))

where ``dk_out`` is dk's first term: ``G`` enters only through ``q exp(G)``, ``k exp(-G)``
factors and the state's decay. ``dg`` is the reverse cumulative sum of ``dG`` inside each
chunk (:func:`~mnemax.kernels.chunked_pallas.decay_grad`).

Layouts: those of :mod:`mnemax.kernels.chunked_pallas` (its gate columns carry only the
segments here, with ``G = 0``), plus ``G`` as (BH, Tp, d_k) float32. States travel
transposed, (d_v, d_k) per row, so that each per-channel factor is a (1, d_k) row
broadcasting over a state tile (Triton cannot transpose a vector). The per-chunk kernels
take the key columns in blocks of :data:`BLOCK_K` (``A`` and every intra-chunk term are
sums over key columns), so their (L, d_k) float32 factors never sit in registers whole
(at d_k 128 and chunk 64 the unsplit kernels spilled). Matmul operands follow
:func:`~mnemax.kernels.chunked_gpu.matmuls`; the 0/1 placement matmuls run at the float32
policy.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..chunked import SUB_CHUNK, decay_span, mid_range
from ..chunked_gpu import ChunkedConfig, compiler_params, make_problem, matmuls, walk_block
from ..chunked_pallas import (
    F32,
    GATE_COLS,
    ROW_SEG,
    Matmul,
    Problem,
    chunk_weights,
    decay_grad,
    dot,
    dot_nt,
    dot_tn,
    mm_dtype,
    pad_axis,
    seq_out,
    state_in_t,
    state_out_t,
)

BLOCK_K = 32  # key columns per step of the per-chunk kernels' key loop
FACTORED = math.inf  # a per-chunk kernel's ``span`` when every chunk is known to be within the limit


def fits_span(ranges, config: ChunkedConfig):
    """Whether every chunk spans at most ``config.span_limit`` nats in every channel (a traced
    bool), from :func:`chunk_decays`' per-chunk ranges, or None when the limit is 0 (the
    sub-chunked form only). The kernels' own per-chunk and per-key-block test reads the same
    ``G``, and a chunk's span bounds each of its key blocks', so where this holds every one of
    them takes the factored form. None also where ``config.form_per_call`` is False."""
    if config.span_limit <= 0 or not config.form_per_call:
        return None
    return jnp.max(ranges) <= config.span_limit


def by_span(fits, config: ChunkedConfig, run):
    """``run(span)``, ``span`` the per-chunk kernels' static form: :data:`FACTORED` where
    ``fits`` (:func:`fits_span`) holds, else ``config.span_limit`` (the kernels choose per chunk
    and key block), chosen by one ``lax.cond`` outside the kernels. The factored-only kernels
    hold no second form behind an in-kernel ``lax.cond``: fewer registers (compiled for sm_90 on
    the CPU, KDA's output kernel 168 per thread instead of 254, its WY kernel no spill instead of
    144 bytes) and the same values, bit for bit."""
    if fits is None:
        return run(config.span_limit)
    return lax.cond(fits, lambda: run(FACTORED), lambda: run(config.span_limit))


def _decays_kernel(g_r, *refs, L: int, decayed: int, scale: float):
    """One chunk's (and key block's) cumulative log decay and each channel's range over it;
    with ``decayed`` 1 or 2 also ``k_out = k exp(G_L - G) [last]`` (and ``q_in = scale q
    exp(G) [fresh]``) in the matmul dtype, the state walks' operands."""
    n_in = decayed + 1 if decayed else 0  # the gate columns, k and (decayed 2) q
    ins, (G_r, r_r, *x_out) = refs[:n_in], refs[n_in:]
    G = jnp.cumsum(g_r[...].astype(F32), axis=0)
    G_r[...] = G
    r_r[...] = jnp.max(G, axis=0, keepdims=True) - jnp.min(G, axis=0, keepdims=True)
    if not decayed:
        return
    gc_r, k_r, *q_r = ins
    w = chunk_weights(gc_r, L)
    last = lax.broadcasted_iota(jnp.int32, G.shape, 0) == L - 1
    G_L = jnp.sum(jnp.where(last, G, 0.0), axis=0, keepdims=True)  # row L - 1 exactly
    x_out[0][...] = (k_r[...].astype(F32) * (w.k_out * jnp.exp(G_L - G))).astype(x_out[0].dtype)
    if q_r:
        x_out[1][...] = (q_r[0][...].astype(F32) * (w.q_in * scale * jnp.exp(G))).astype(x_out[1].dtype)


def chunk_decays(g, L: int, *, interpret: bool, p: Problem | None = None, decayed: int = 0, scale: float = 1.0):
    """``g`` (BH, Tp, d_k) (padded, any float dtype) -> (``G`` (BH, Tp, d_k) float32, its
    cumulative sum inside each chunk of ``L`` steps; the range ``max_t G - min_t G`` of each
    chunk and channel (BH, NC, d_k) float32, for :func:`fits_span`), in one pass over ``g``:
    the same values as ``jnp.cumsum`` and a reduction over ``G`` in XLA, which read and wrote
    the float32 ``G`` twice more (on an H100 that glue was 0.28 ms of KDA's 1.56 ms forward at
    (8, 2048, 16, 128)).

    ``decayed`` 1 (with ``p``, the :class:`Problem` of the same chunks) appends ``k_out = k
    exp(G_L - G) [last]`` and 2 also ``q_in = scale q exp(G) [fresh]``, each (BH, Tp, d_k) in
    the matmul dtype: the delta rule's per-channel state walks read these instead of ``k``,
    ``q`` and ``G`` in every value tile, and forming them here, where ``G`` is made, streams
    the keys (and queries) once more instead of adding their writes to the per-chunk kernels
    (KDA's WY kernel took 0.46 -> 0.56 ms at (8, 2048) with ``k_out``, H100)."""
    BH, Tp, dk = g.shape
    bk = min(dk, 64)
    spec = pl.BlockSpec((None, L, bk), lambda b, c, j: (b, c, j))
    ins, in_specs = [g], [spec]
    out_shape = [jax.ShapeDtypeStruct((BH, Tp, dk), F32), jax.ShapeDtypeStruct((BH, Tp // L, dk), F32)]
    if decayed:
        ins += [p.gcol, p.k] + [p.q] * (decayed == 2)
        in_specs += [pl.BlockSpec((None, None, L, GATE_COLS), lambda b, c, j: (b, c, 0, 0))] + [spec] * decayed
        out_shape += [jax.ShapeDtypeStruct((BH, Tp, dk), mm_dtype(p.q.dtype))] * decayed
    return pl.pallas_call(
        functools.partial(_decays_kernel, L=L, decayed=decayed, scale=scale), grid=(BH, Tp // L, dk // bk),
        in_specs=in_specs,
        out_specs=[spec, pl.BlockSpec((None, 1, bk), lambda b, c, j: (b, c, j))] + [spec] * decayed,
        out_shape=out_shape, compiler_params=compiler_params(interpret, 4, 1), interpret=interpret,
    )(*ins)


def channel_problem(q, k, v, g, resets, chunk_size: int, beta=None, *, config: ChunkedConfig, interpret: bool,
                    decayed: int = 0, scale: float = 1.0):
    """(the :class:`~mnemax.kernels.chunked_pallas.Problem` of q, k, v, the resets and ``beta``
    (the delta rule's, or None), no decay in its gate columns; ``G`` (BH, Tp, d_k) float32,
    the cumulative log decay of ``g`` (B, H, T, d_k) inside each chunk, zero on padded steps
    and channels (:func:`chunk_decays`); :func:`fits_span` of its chunks, or None; the tuple
    of ``decayed`` arrays of :func:`chunk_decays`, ``(k_out,)`` or ``(k_out, q_in)``, or ())."""
    p = make_problem(q, k, v, None, beta, resets, chunk_size)
    B, H, T, dk = g.shape
    g = pad_axis(pad_axis(g.reshape(B * H, T, dk), 1, p.n_chunks * p.L), 2, p.d_k)
    G, ranges, *xs = chunk_decays(g, p.L, interpret=interpret, p=p, decayed=decayed, scale=scale)
    return p, G, fits_span(ranges, config), tuple(xs)


# ----------------------------------------------------------------------------- in-kernel math


def key_block(d_k: int) -> int:
    """The key columns one step of the per-chunk kernels' key loop handles (their (L, d_k)
    per-channel factors are formed a block at a time)."""
    return min(d_k, BLOCK_K)


def intra(q_r, k_r, G_r, gc_r, gr_r, kc, L: int, mm: Matmul, f32: Matmul, dA=None, scale: float = 1.0, acc=None, *,
          span: float):
    """Key columns ``kc`` (a ``pl.ds``) of a chunk's scores, ``A_ts = sum_{d in kc} q_td k_sd
    exp(G_td - G_sd)`` (L, L) float32, unscaled, for s <= t in one segment, else 0, from the
    (L, d_k) refs of one chunk (see the module docstring). With ``dA`` (L, L) (dL/dA of the
    scaled scores, unmasked) also returns ``acc`` = (dq, dk) (L, kc) plus these columns of the
    scores' gradients with respect to q and k.

    Two exact forms, chosen per chunk and key block by the decay's span there, ``max_d
    (max_t G_td - min_t G_td)``: up to ``span`` nats (``ChunkedConfig.span_limit``),
    :func:`intra_factored` (one matmul, every factor within ``exp(+-span / 2)``); beyond,
    :func:`intra_sub_chunked` (every exponent <= 0, for gates of any strength). ``span`` 0:
    the sub-chunked form only; :data:`FACTORED`: the factored form only (the caller has
    checked every chunk, :func:`by_span`)."""
    args = (q_r, k_r, G_r, gc_r, gr_r, kc, L, mm, f32, dA, scale, acc)
    if span <= 0:
        return intra_sub_chunked(*args)
    if span == FACTORED:
        return intra_factored(*args)
    return lax.cond(decay_span(G_r[:, kc]) <= span, lambda: intra_factored(*args), lambda: intra_sub_chunked(*args))


def intra_factored(q_r, k_r, G_r, gc_r, gr_r, kc, L: int, mm: Matmul, f32: Matmul, dA=None, scale: float = 1.0,
                   acc=None):
    """:func:`intra` as one matmul per key block (for a decay span up to ``span_limit``):
    ``A = (q exp(G - c)) (k exp(c - G))^T`` masked, with ``c`` (1, kc) the middle of each
    column's range of ``G``; its gradients ``dq = exp(G - c) (.) (dA (k exp(c - G)))`` and
    ``dk = exp(c - G) (.) (dA^T (q exp(G - c)))``. Exact up to the operands' rounding (each
    term is a product, nothing cancels), at the float32 policy ``f32`` whatever the inputs'
    dtype: the scaled operands are new values (a 16-bit rounding of them would add to the
    inputs' own; float16 would overflow at 65504)."""
    G = G_r[:, kc]
    centre = mid_range(G)
    F, E = jnp.exp(G - centre), jnp.exp(centre - G)
    Qf, Kf = q_r[:, kc].astype(F32) * F, k_r[:, kc].astype(F32) * E
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    mask = (col <= row) & (gc_r[:, ROW_SEG:ROW_SEG + 1] == gr_r[ROW_SEG:ROW_SEG + 1, :])
    A = jnp.where(mask, dot_nt(Qf, Kf, f32), 0.0)
    if dA is None:
        return A
    dAm = jnp.where(mask, dA, 0.0) * scale
    return A, acc[0] + F * dot(dAm, Kf, f32), acc[1] + E * dot_tn(dAm, Qf, f32)


def intra_sub_chunked(q_r, k_r, G_r, gc_r, gr_r, kc, L: int, mm: Matmul, f32: Matmul, dA=None, scale: float = 1.0,
                      acc=None):
    """:func:`intra` for any decay: row sub-chunk ``i`` (rows ``t``, ``c`` of them, from
    ``r0``) is a (c, L) block: its earlier key steps ``s < r0`` from one matmul of ``q exp(G_t
    - G_r)`` and ``k exp(G_r - G_s)`` (r = r0 - 1; the first sub-chunk has no earlier keys),
    its diagonal (c, c) block exactly by a loop over its key steps; each block is then placed
    into the (L, L) and (L, kc) results by a 0/1 matmul (Triton cannot concatenate). Every
    exponent is <= 0."""
    C = SUB_CHUNK
    grads = dA is not None
    seg_row = gr_r[ROW_SEG:ROW_SEG + 1, :]
    key = lax.broadcasted_iota(jnp.int32, (L, 1), 0)
    r = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    s = lax.broadcasted_iota(jnp.int32, (C, L), 1)

    def sub_chunk(i, carry):
        r0 = pl.multiple_of(i * C, C)
        rows = pl.ds(r0, C)
        q_i, G_i = q_r[rows, kc].astype(F32), G_r[rows, kc]
        G_ref = G_r[pl.ds(jnp.maximum(r0 - 1, 0), 1), kc]
        E_k = jnp.exp(jnp.where(key < r0, G_ref - G_r[:, kc], -jnp.inf))  # (L, kc), 0 from the sub-chunk on
        F_q = jnp.exp(G_i - G_ref)  # (c, kc)
        Qr, Kr = q_i * F_q, k_r[:, kc].astype(F32) * E_k
        mask = (s <= r0 + r) & (gc_r[rows, ROW_SEG:ROW_SEG + 1] == seg_row)
        place = (lax.broadcasted_iota(jnp.int32, (L, C), 0) == lax.broadcasted_iota(jnp.int32, (L, C), 1) + r0)
        place = place.astype(F32)
        if grads:
            dA_i = jnp.where(mask, dot_tn(place, dA, f32), 0.0) * scale

        def diagonal(j, blocks):
            t_s = r0 + j
            k_s, G_s = k_r[pl.ds(t_s, 1), kc].astype(F32), G_r[pl.ds(t_s, 1), kc]
            E = jnp.exp(jnp.where(r >= j, G_i - G_s, -jnp.inf))  # (c, kc)
            kE = k_s * E
            a = jnp.where(s == t_s, jnp.sum(q_i * kE, axis=1, keepdims=True), 0.0)
            if not grads:
                return (blocks[0] + a,)
            dA_s = jnp.sum(jnp.where(s == t_s, dA_i, 0.0), axis=1, keepdims=True)  # (c, 1)
            dk_s = jnp.sum(dA_s * q_i * E, axis=0, keepdims=True)
            return blocks[0] + a, blocks[1] + dA_s * kE, blocks[2] + jnp.where(r == j, dk_s, 0.0)

        zc = jnp.zeros(q_i.shape, F32)
        blocks = lax.fori_loop(0, C, diagonal, (jnp.zeros((C, L), F32),) + ((zc, zc) if grads else ()))
        A = carry[0] + dot(place, jnp.where(mask, dot_nt(Qr, Kr, mm) + blocks[0], 0.0), f32)
        if not grads:
            return (A,)
        dA_off = jnp.where(s < r0, dA_i, 0.0)
        dq = carry[1] + dot(place, F_q * dot(dA_off, Kr, mm) + blocks[1], f32)
        dk = carry[2] + E_k * dot_tn(dA_off, Qr, mm) + dot(place, blocks[2], f32)
        return A, dq, dk

    zA = jnp.zeros((L, L), F32)
    out = lax.fori_loop(0, L // C, sub_chunk, (zA,) + (tuple(acc) if grads else ()))
    return out if grads else out[0]


# ----------------------------------------------------------------------------- kernels


def carry_decay(G_r, gc_r, c, L: int):
    """(1, d_k) ``exp(G_L) [carries]`` of chunk ``c``: the incoming state's decay over the chunk,
    from one row of a whole-row ``G`` ref (the state walks')."""
    t0 = pl.multiple_of(c * L, L)
    return chunk_weights(gc_r, L, c).a * jnp.exp(G_r[pl.ds(t0 + L - 1, 1), :])


def _walk_kernel(v_r, ko_r, G_r, gc_r, s0_r, st_r, sT_r, *, L, NC, mm):
    """Per chunk: save S_in; S = Diag(exp(G_L) [carries]) S + k_out^T V (transposed; ``k_out``
    from :func:`chunk_decays`)."""

    def body(c, S):
        st_r[c] = S.astype(st_r.dtype)
        t = pl.ds(pl.multiple_of(c * L, L), L)
        return carry_decay(G_r, gc_r, c, L) * S + dot_tn(v_r[t, :], ko_r[t, :], mm)

    sT_r[...] = lax.fori_loop(0, NC, body, s0_r[...])


def walk_forward(p: Problem, G, k_out, s0, *, config: ChunkedConfig, interpret: bool):
    """The forward state walk from ``s0`` (BH, d_v, d_k) (transposed, float32), with ``k_out =
    k exp(G_L - G) [last]`` from :func:`chunk_decays` (formed once, not in every value tile).
    Returns (the incoming state of every chunk (BH, NC, d_v, d_k) in the matmul dtype, the
    final state (BH, d_v, d_k) float32)."""
    return walk(_walk_kernel, p, ("values", "keys", "keys", "gates", "tile"), (p.v, k_out, G, p.gcol, s0),
                config=config, interpret=interpret)


def walk(kernel, p: Problem, specs, args, *, values_out: bool = False, values_dtype=None, config: ChunkedConfig,
         interpret: bool):
    """A state walk (this module's and the per-channel delta rule's): grid (rows, value tiles
    of the state), each program sequential over the chunks; ``specs`` names each input's
    block (a whole row of ``keys`` (Tp, d_k) or ``values`` (Tp, tile), the ``gates`` columns,
    the state ``tile`` (tile, d_k)). Outputs: every chunk's state tile (BH, NC, d_v, d_k) in
    the matmul dtype, with ``values_out`` a ``values`` array (BH, Tp, d_v) in ``values_dtype``
    (None: the matmul dtype), the last state tile float32.

    Float32 operands take one pipeline stage: at d_k = 128, chunk 64 and a state tile of 64
    values the delta rule's adjoint walk (three three-pass TF32 products) needs 290 KiB of
    shared memory at two stages and 96 KiB at one (Triton 3.9 for sm_90, compiled on the
    CPU); Hopper has 227 KiB."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp, dk, dv = NC * L, p.d_k, p.d_v
    bv = walk_block(BH, dv, config)
    tile = pl.BlockSpec((None, bv, dk), lambda b, j: (b, j, 0))
    values = pl.BlockSpec((None, Tp, bv), lambda b, j: (b, 0, j))
    blocks = {"keys": pl.BlockSpec((None, Tp, dk), lambda b, j: (b, 0, 0)), "values": values,
              "gates": pl.BlockSpec((None, NC, L, GATE_COLS), lambda b, j: (b, 0, 0, 0)), "tile": tile}
    mm, _ = matmuls(p.q.dtype, interpret)
    out_specs = [pl.BlockSpec((None, NC, bv, dk), lambda b, j: (b, 0, j, 0))] + [values] * values_out + [tile]
    out_shape = ([jax.ShapeDtypeStruct((BH, NC, dv, dk), mm.dtype)]
                 + [jax.ShapeDtypeStruct((BH, Tp, dv), values_dtype or mm.dtype)] * values_out
                 + [jax.ShapeDtypeStruct((BH, dv, dk), F32)])
    return pl.pallas_call(
        functools.partial(kernel, L=L, NC=NC, mm=mm), grid=(BH, dv // bv), in_specs=[blocks[n] for n in specs],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(interpret, config.walk_warps, 1 if mm.dtype == F32 else config.num_stages),
        interpret=interpret,
    )(*args)


def _walk_back_kernel(qi_r, do_r, G_r, gc_r, ds_r, dst_r, ds0_r, *, L, NC, mm):
    """The adjoint walk (see :func:`walk_backward`)."""

    def body(j, dS):
        c = NC - 1 - j
        dst_r[c] = dS.astype(dst_r.dtype)
        t = pl.ds(pl.multiple_of(c * L, L), L)
        return carry_decay(G_r, gc_r, c, L) * dS + dot_tn(do_r[t, :], qi_r[t, :], mm)

    ds0_r[...] = lax.fori_loop(0, NC, body, ds_r[...])


def walk_backward(p: Problem, G, do, q_in, dS_T, *, config: ChunkedConfig, interpret: bool):
    """The adjoint walk from the last chunk, ``dS_in = Diag(exp(G_L) [carries]) dS_out +
    q_in^T dO``, transposed, with ``q_in = scale q exp(G) [fresh]`` from :func:`chunk_decays`.
    Returns (every chunk's outgoing-state gradient (BH, NC, d_v, d_k) in the matmul dtype, the
    initial state's gradient (BH, d_v, d_k) float32)."""
    return walk(_walk_back_kernel, p, ("keys", "values", "keys", "gates", "tile"), (q_in, do, G, p.gcol, dS_T),
                config=config, interpret=interpret)


def chunk_specs(p: Problem):
    """BlockSpecs of the per-chunk kernels, grid (BH, NC): program (b, c) runs chunk c of row b."""
    L = p.L
    row = lambda d: pl.BlockSpec((None, L, d), lambda b, c: (b, c, 0))  # noqa: E731
    chunk = lambda *s: pl.BlockSpec((None, None, *s), lambda b, c: (b, c) + (0,) * len(s))  # noqa: E731
    return {"k": row(p.d_k), "v": row(p.d_v), "gc": chunk(L, GATE_COLS), "gr": chunk(GATE_COLS, L),
            "S": chunk(p.d_v, p.d_k)}


def _out_kernel(q_r, k_r, v_r, G_r, gc_r, gr_r, s_r, o_r, *, L, nk, bk, nv, bv, span, scale, mm, f32):
    def scores(j, A):
        return A + intra(q_r, k_r, G_r, gc_r, gr_r, pl.ds(pl.multiple_of(j * bk, bk), bk), L, mm, f32, span=span)

    A = (lax.fori_loop(0, nk, scores, jnp.zeros((L, L), F32)) * scale).astype(mm.dtype)
    w = chunk_weights(gc_r, L)
    qs = (q_r[...].astype(F32) * (w.q_in * scale * jnp.exp(G_r[...]))).astype(mm.dtype)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        o_r[:, vc] = (dot(A, v_r[:, vc], mm) + dot_nt(qs, s_r[vc, :], mm)).astype(o_r.dtype)
        return carry

    lax.fori_loop(0, nv, block, 0)


def outputs(p: Problem, G, states, out_dtype, *, scale: float, config: ChunkedConfig, interpret: bool,
            span: float):
    """o = (scale q exp(G) [fresh]) S_in + A V for every chunk, (BH, Tp, d_v) in ``out_dtype``;
    ``span``: the scores' form (:func:`intra`, from :func:`by_span`)."""
    BH, NC = p.q.shape[0], p.n_chunks
    bv, bk = config.value_block(p.d_v), key_block(p.d_k)
    sp = chunk_specs(p)
    mm, f32 = matmuls(p.q.dtype, interpret, config)
    return pl.pallas_call(
        functools.partial(_out_kernel, L=p.L, nk=p.d_k // bk, bk=bk, nv=p.d_v // bv, bv=bv,
                          span=span, scale=scale, mm=mm, f32=f32),
        grid=(BH, NC), in_specs=[sp["k"], sp["k"], sp["v"], sp["k"], sp["gc"], sp["gr"], sp["S"]],
        out_specs=sp["v"], out_shape=jax.ShapeDtypeStruct((BH, NC * p.L, p.d_v), out_dtype),
        compiler_params=compiler_params(interpret, config.num_warps, config.num_stages), interpret=interpret,
    )(p.q, p.k, p.v, G, p.gcol, p.grow, states)


def _grads_kernel(q_r, k_r, v_r, do_r, G_r, ko_r, gc_r, gr_r, s_r, ds_r, dq_r, dk_r, dv_r, dg_r, *, L, nk, bk, nv,
                  bv, span, scale, mm, f32):
    """One chunk's dq, dk, dv and dG; see :func:`chunk_grads`."""
    w = chunk_weights(gc_r, L)
    is_last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1

    def scores_grad(j, dA):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        return dA + dot_nt(do_r[:, vc], v_r[:, vc], mm)

    dA = lax.fori_loop(0, nv, scores_grad, jnp.zeros((L, L), F32))

    def k_out(kc):
        G_L = G_r[L - 1:L, kc]
        return w.k_out * jnp.exp(G_L - G_r[:, kc])

    def keys(i, A):
        kc = pl.ds(pl.multiple_of(i * bk, bk), bk)

        def inter(j, acc):
            dQ, dK, ga = acc
            vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
            S, dS, dO = s_r[vc, kc], ds_r[vc, kc], do_r[:, vc]
            return (dQ + dot(dO, S, mm), dK + dot(v_r[:, vc], dS, mm),
                    ga + jnp.sum(S.astype(F32) * dS.astype(F32), axis=0, keepdims=True))

        zk = jnp.zeros((L, bk), F32)
        dQ, dK, ga = lax.fori_loop(0, nv, inter, (zk, zk, jnp.zeros((1, bk), F32)))
        q, k, G = q_r[:, kc].astype(F32), k_r[:, kc].astype(F32), G_r[:, kc]
        dK = k_out(kc) * dK
        last = jnp.sum(k * dK, axis=0, keepdims=True) + w.a * jnp.exp(G_r[L - 1:L, kc]) * ga
        A_k, dQ, dK = intra(q_r, k_r, G_r, gc_r, gr_r, kc, L, mm, f32, dA=dA, scale=scale,
                            acc=(dQ * (w.q_in * scale * jnp.exp(G)), dK), span=span)
        dq_r[:, kc] = dQ.astype(dq_r.dtype)
        dk_r[:, kc] = dK.astype(dk_r.dtype)
        dg_r[:, kc] = q * dQ - k * dK + jnp.where(is_last, last, 0.0)
        return A + A_k

    A = (lax.fori_loop(0, nk, keys, jnp.zeros((L, L), F32)) * scale).astype(mm.dtype)

    def values(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)

        def keys_out(i, dV):
            kc = pl.ds(pl.multiple_of(i * bk, bk), bk)
            return dV + dot_nt(ko_r[:, kc], ds_r[vc, kc], mm)

        dv_r[:, vc] = lax.fori_loop(0, nk, keys_out, dot_tn(A, do_r[:, vc], mm)).astype(dv_r.dtype)
        return carry

    lax.fori_loop(0, nv, values, 0)


def chunk_grads(p: Problem, G, k_out, do, states, dstates, *, scale: float, config: ChunkedConfig, interpret: bool,
                span: float):
    """dq, dk, dv and dG ((BH, Tp, d), float32) for every chunk, given each chunk's incoming
    state ``states`` and outgoing-state gradient ``dstates`` (both transposed) and ``k_out =
    k exp(G_L - G) [last]`` from :func:`chunk_decays` (dv's ``k_out dS_out``); ``span`` as
    :func:`outputs`."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp = NC * L
    bv, bk = config.value_block(p.d_v), key_block(p.d_k)
    sp = chunk_specs(p)
    mm, f32 = matmuls(p.q.dtype, interpret, config)
    return pl.pallas_call(
        functools.partial(_grads_kernel, L=L, nk=p.d_k // bk, bk=bk, nv=p.d_v // bv, bv=bv,
                          span=span, scale=scale, mm=mm, f32=f32),
        grid=(BH, NC),
        in_specs=[sp["k"], sp["k"], sp["v"], sp["v"], sp["k"], sp["k"], sp["gc"], sp["gr"], sp["S"], sp["S"]],
        out_specs=[sp["k"], sp["k"], sp["v"], sp["k"]],
        out_shape=[jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32)],
        compiler_params=compiler_params(interpret, config.bwd_warps, config.num_stages), interpret=interpret,
    )(p.q, p.k, p.v, do, G, k_out, p.gcol, p.grow, states, dstates)


# ----------------------------------------------------------------------------- the op


def forward(q, k, v, g, state, cut, *, chunk_size: int, scale: float, config: ChunkedConfig, interpret: bool):
    """(o (B, H, T, d_v) in q's dtype, the final state (B, H, d_k, d_v) float32, every chunk's
    incoming state (the backward's residual)) for per-channel ``g`` (B, H, T, d_k); ``cut``:
    the resets as float32 or None."""
    p, G, fits, (k_out,) = channel_problem(q, k, v, g, cut, chunk_size, config=config, interpret=interpret, decayed=1)
    states, S_T = walk_forward(p, G, k_out, state_in_t(p, state), config=config, interpret=interpret)
    o = by_span(fits, config,
                lambda span: outputs(p, G, states, q.dtype, scale=scale, config=config, interpret=interpret, span=span))
    return seq_out(o, v.shape), state_out_t(S_T, state.shape), states


def backward(q, k, v, g, state, cut, states, do, dfinal, *, chunk_size: int, scale: float, config: ChunkedConfig,
             interpret: bool):
    """The cotangents (dq, dk, dv, dg, dstate) of :func:`forward`'s (o, final state), in the
    inputs' shapes and dtypes."""
    p, G, fits, (k_out, q_in) = channel_problem(q, k, v, g, cut, chunk_size, config=config, interpret=interpret,
                                                decayed=2, scale=scale)
    B, H, T, _ = q.shape
    do = pad_axis(pad_axis(do.astype(q.dtype).reshape(B * H, T, -1), 1, p.n_chunks * p.L), 2, p.d_v)
    dstates, dS0 = walk_backward(p, G, do, q_in, state_in_t(p, dfinal), config=config, interpret=interpret)
    dq, dk, dv, dG = by_span(fits, config, lambda span: chunk_grads(
        p, G, k_out, do, states, dstates, scale=scale, config=config, interpret=interpret, span=span))
    dg = decay_grad(dG.reshape(B * H, p.n_chunks, p.L, p.d_k)).reshape(dG.shape)
    return (seq_out(dq, q.shape).astype(q.dtype), seq_out(dk, k.shape).astype(k.dtype),
            seq_out(dv, v.shape).astype(v.dtype), seq_out(dg, g.shape).astype(g.dtype),
            state_out_t(dS0, state.shape).astype(state.dtype))
