"""Pallas GPU (Triton) kernels the matrix-state ops share: ``gated_linear_attention`` and
``delta_rule`` with no decay or one log decay per head (Mamba-2's SSD, RetNet, Lightning
attention, simple GLA; DeltaNet, Gated DeltaNet). Their chunkwise forms differ only in
what a chunk writes into the state: the values ``V`` (linear attention) or the delta
errors ``W`` that the WY/UT representation gives (delta rule; :mod:`mnemax.kernels.delta_rule.gpu`
computes ``U = T V`` and ``Wk = T K~`` per chunk before the walk). With ``G_t`` the
cumulative log decay since the chunk's start, ``D_ts = exp(G_t - G_s)`` for ``s <= t`` in
one segment (resets cut segments; :mod:`mnemax.kernels.chunked`), per chunk::

    X      = V                       (linear attention)
    X      = U - Wk S_in             (delta rule, beta folded into U and Wk)
    o      = (scale q * exp(G) [fresh]) S_in + (scale q k^T (.) D) X
    S_out  = exp(G_L) [no reset] S_in + (k * exp(G_L - G) [last segment])^T X

Every exponent is <= 0. The kernels split this into what is sequential and what is not:

1. the state walk (:func:`walk`; sequential over chunks, one program per (row, value
   tile) holding the whole ``d_k`` x tile state in float32): saves each chunk's incoming
   state (and, for the delta rule, each chunk's ``X``), returns the final state;
2. the outputs (:func:`outputs`; one program per (row, chunk), all in parallel): the
   chunk's decayed scores once, then a loop over value blocks.

The backward mirrors it: the adjoint walk (:func:`walk` with ``reverse``) carries
``dS_in = exp(G_L) dS_out + (scale q exp(G))^T dO [- Wk^T dX]`` from the last chunk and
saves each chunk's outgoing-state gradient (and ``dX = P^T dO + K_out dS_out`` for the
delta rule, whose ``P^T dO`` comes first from :func:`scores_t_times`); then one program
per (row, chunk) writes dq, dk, dv and the gradient of each step's cumulative log decay
``dG`` (:func:`chunk_grads`; the caller turns ``dG`` into ``dg`` by a reverse cumulative sum
inside each chunk, since ``G_t = sum_{u <= t} g_u``).

Layouts (:mod:`mnemax.kernels.chunked_pallas`, shared with the TPU kernels): rows are batch
x heads (``BH``), time is padded to ``NC`` chunks of ``L`` steps (here a power of two >= 16),
``d_k`` and ``d_v`` to powers of two >= 16 (Triton's ``tl.dot``; wgmma on Hopper), per-step
gate quantities as columns and rows. Grouped query/key heads (each q/k head serving
``rep`` value heads, Mamba-2's groups of B and C) are read in place through the index maps
(:func:`~mnemax.kernels.chunked_pallas.qk_row`), never repeated in memory; dq and dk come
out per value head and the op sums them over each group. With ``ChunkedConfig.group_heads``
the scalar-decay linear attention's per-chunk kernels run several value heads of one group per
program instead (:mod:`mnemax.kernels.gated_linear_attention.gpu_grouped`): the chunk's ``q k^T``
once for them, and dq and dk summed over them in the kernel. Matmul operands are bfloat16/float16 for 16-bit inputs,
float32 otherwise (one- or three-pass TF32, see :func:`matmuls`), always with float32
accumulation and a float32 carried state.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .chunked import SPAN_LIMIT
from .chunked_pallas import (
    F32,
    GATE_COLS,
    ROW_BETA,
    Matmul,
    Problem,
    chunk_weights,
    col_to_row,
    decay_mask,
    dot,
    dot_nt,
    dot_tn,
    mm_dtype,
    pow2,
    problem,
    qk_row,
    row_to_col,
    split_dot,
)
from .dispatch import gpu_sm_count


def _power_of_two(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and not x & (x - 1)


@dataclasses.dataclass(frozen=True)
class ChunkedConfig:
    """Tuning of the Pallas GPU kernels of ``gated_linear_attention`` and ``delta_rule``: a
    frozen, hashable value passed as ``config=`` (a static argument; ``None``: these
    defaults). The other backends ignore it.

    Attributes:
      block_v: value columns per step of the per-chunk kernels' value loop. None: 64, except
        the scalar-decay linear attention's (simple GLA, Mamba-2's op), which takes two blocks
        of d_v / 2 (16 to 64): at Mamba-2's d_v = 64 its gradient kernel ran 25% faster with two
        32-wide blocks than with one 64-wide (H100), while DeltaNet's and the per-channel
        kernels spill as much or more at 32 (compiled for sm_90); see :meth:`value_block`.
      walk_block_v: value columns of one state-walk program (its state tile is d_k x this);
        None: 64, halved (down to 16) while batch x heads x value tiles leaves SMs idle (each
        walk program is sequential over the chunks).
      num_warps: warps of the per-chunk forward kernels.
      bwd_warps: warps of the per-chunk backward kernel.
      walk_warps: warps of the state walks.
      num_stages: Triton pipeline stages of every kernel (the gradient kernel uses one for
        float32 operands, which need the shared memory).
      wy_block: row block of the delta rule's WY/UT preparation: the chunk's unit lower
        triangular inverse by block forward substitution over blocks of this many steps
        (a power of two >= 16; the chunk size or more: one block, all by doubling). None:
        16 for no decay or one per head, 32 for per-channel decays (KDA); see
        :meth:`wy_rows`.
      f32_passes: for 16-bit inputs, the TF32 passes of the float32 products (decays,
        inverses, gradients; see :func:`matmuls`): 1 or 3. Float32 inputs always take 3.
      span_limit: the per-channel kernels (GLA, KDA) form a chunk's intra-chunk scores (and
        KDA's WY blocks) as one factored matmul where its cumulative decay spans at most this
        many nats in every key channel of a block (factors within ``exp(+-span_limit / 2)``),
        else in sub-chunks with every exponent <= 0; from 0 (always sub-chunks) to 100.
        Default :data:`mnemax.kernels.chunked.SPAN_LIMIT`, the ``xla`` form's limit.
      form_per_call: where every chunk of a call spans at most ``span_limit`` (one ``lax.cond``
        outside the kernels decides), run per-chunk kernels that hold only the factored form
        (fewer registers); False: the kernels holding both forms, choosing per chunk and key
        block, whatever the call. The values are the same either way.
      group_heads: with grouped q/k heads (Mamba-2's groups of B and C), at most this many
        value heads of one group per program of the scalar-decay linear attention's per-chunk
        kernels (the largest divisor of the heads per group up to it, see
        :meth:`heads_per_program`; mamba2-130m has 24 in one group): the chunk's ``q k^T`` is
        formed once for them, and the gradient kernel sums their dq and dk before writing
        (:mod:`~mnemax.kernels.gated_linear_attention.gpu_grouped`), leaving the op the sum over the group's other programs,
        none where one program runs the whole group. 1: one program per value head, every
        program forming ``q k^T`` and writing dq and dk per value head for the op to sum.
    """

    block_v: int | None = None
    walk_block_v: int | None = None
    num_warps: int = 4
    bwd_warps: int = 8
    walk_warps: int = 4
    num_stages: int = 2
    wy_block: int | None = None
    f32_passes: int = 1
    span_limit: float = SPAN_LIMIT
    form_per_call: bool = True
    group_heads: int = 1

    def __post_init__(self):
        for name in ("block_v", "walk_block_v", "wy_block"):
            value = getattr(self, name)
            if not (value is None or (_power_of_two(value) and value >= 16)):
                raise ValueError(f"ChunkedConfig.{name}: got {value!r}; expected a power of two >= 16")
        if isinstance(self.group_heads, bool) or not isinstance(self.group_heads, int) or not 1 <= self.group_heads <= 256:
            raise ValueError(f"ChunkedConfig.group_heads: got {self.group_heads!r}; expected an int from 1 to 256")
        for name in ("num_warps", "bwd_warps", "walk_warps"):
            value = getattr(self, name)
            if not (_power_of_two(value) and value <= 32):
                raise ValueError(f"ChunkedConfig.{name}: got {value!r}; expected a power of two from 1 to 32")
        if self.f32_passes not in (1, 3) or isinstance(self.f32_passes, bool):
            raise ValueError(f"ChunkedConfig.f32_passes: got {self.f32_passes!r}; expected 1 or 3")
        if isinstance(self.span_limit, bool) or not isinstance(self.span_limit, (int, float)) \
                or not 0 <= self.span_limit <= 100:
            raise ValueError(f"ChunkedConfig.span_limit: got {self.span_limit!r}; expected a number from 0 to 100")
        if not isinstance(self.form_per_call, bool):
            raise ValueError(f"ChunkedConfig.form_per_call: got {self.form_per_call!r}; expected True or False")
        if not (isinstance(self.num_stages, int) and not isinstance(self.num_stages, bool) and self.num_stages >= 1):
            raise ValueError(f"ChunkedConfig.num_stages: got {self.num_stages!r}; expected a positive int")

    def wy_rows(self, L: int, *, channel: bool = False) -> int:
        """The WY preparation's row block at chunk ``L``: ``wy_block`` when set, else 16, or
        32 for per-channel decays (``channel``); at most ``L``. Measured on an H100
        (benchmarks/RESULTS.md, 2026-12-07, seventh session): KDA's WY kernel at (8, 2048, 16,
        d 128), chunk 64, took 0.602 ms in blocks of 16 (ten 16 x 16 key-score blocks, each
        a matmul over key blocks), 0.462 in blocks of 32 and 0.461 in one block of 64 (the
        doubling product); the per-head kernel's blocks of 16 had beaten one block of 64 (the
        third session's run)."""
        b = self.wy_block if self.wy_block is not None else (32 if channel else 16)
        return min(L, b)

    def heads_per_program(self, rep: int) -> int:
        """The value heads one per-chunk program runs where each q/k head serves ``rep``
        value heads: the largest divisor of ``rep`` up to ``group_heads``."""
        return max(d for d in range(1, min(rep, self.group_heads) + 1) if rep % d == 0)

    def value_block(self, d_v: int, *, split: bool = False) -> int:
        """The per-chunk kernels' value block at the padded ``d_v`` (a power of two >= 16):
        ``block_v`` (at most d_v) when set; else 64 at most d_v, or with ``split`` (the
        scalar-decay linear attention's kernels) two blocks of d_v / 2, from 16 to 64. Measured
        on an H100 (benchmarks/RESULTS.md, 2026-12-07): that op's forward+backward at
        (8, 2048, 24, d_k 128, d_v 64) took 1.47 ms with two 32-wide blocks against 1.77 with one
        64-wide, and at d_v 128 1.31 ms with two 64-wide blocks against 1.53 with four 32-wide."""
        if self.block_v is not None:
            return min(d_v, self.block_v)
        return max(16, min(64, d_v // 2)) if split else min(d_v, 64)


def make_problem(q, k, v, g, beta, resets, chunk_size: int) -> Problem:
    """The GPU kernels' layout (:func:`problem` with ``L`` = ``chunk_size`` rounded up to a
    power of two >= 16, never past the padded length, and features padded to powers of two
    >= 16)."""
    T, dk, dv = q.shape[2], q.shape[3], v.shape[3]
    return problem(q, k, v, g, beta, resets, min(pow2(chunk_size), pow2(T)), pow2(dk), pow2(dv))


def matmuls(dtype, interpret: bool, config: ChunkedConfig | None = None) -> tuple[Matmul, Matmul]:
    """(the matmul policy for operands of ``dtype``, the float32 one). Float32 inputs: every
    float32 product as three-pass TF32 on the GPU (tensor cores, float32-level error; the IEEE
    form unrolls into FMA loops that Triton compiles slowly), at HIGHEST in interpret mode.
    16-bit inputs: the float32 products (of decays, inverses and gradients, never of the
    inputs themselves, which go 16-bit) take ``config.f32_passes``: 1, one-pass TF32 (operands
    with 10 mantissa bits, a quarter of bfloat16's rounding; emulated in interpret mode), or
    3, three-pass TF32."""
    x3 = lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    mm = Matmul(mm_dtype(dtype), x3)
    if mm.dtype == F32 or (config or ChunkedConfig()).f32_passes == 3:
        return mm, Matmul(F32, x3)
    if interpret:
        return mm, Matmul(F32, lax.Precision.HIGHEST, tf32_operands=True)
    return mm, Matmul(F32, lax.DotAlgorithmPreset.TF32_TF32_F32)


# ----------------------------------------------------------------------------- kernels


def walk_block(rows: int, d_v: int, config: ChunkedConfig) -> int:
    """The state walk's value tile: ``config.walk_block_v``, or when None 64 halved (down to
    16) while ``rows`` x tiles would not fill every SM."""
    if config.walk_block_v is not None:
        return min(d_v, config.walk_block_v)
    bv = min(d_v, 64)
    while bv > 16 and rows * (d_v // bv) < gpu_sm_count():
        bv //= 2
    return bv


def compiler_params(interpret: bool, warps: int, stages: int):
    """Triton's compiler parameters (None in interpret mode)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def _walk_kernel(x_r, k_r, xw_r, gc_r, s0_r, st_r, xo_r, sT_r, *, L, NC, delta, mm):
    """Per chunk: save S_in; X = x [- Wk S_in] (saved for the delta rule); S = a S + (k k_out)^T X."""

    def body(c, S):
        st_r[c] = S.astype(st_r.dtype)
        t = pl.ds(pl.multiple_of(c * L, L), L)
        w = chunk_weights(gc_r, L, c)
        X = x_r[t, :].astype(F32)
        if delta:
            X = X - dot(xw_r[t, :], S, mm)
            xo_r[t, :] = X.astype(xo_r.dtype)
        return w.a * S + dot_tn(k_r[t, :].astype(F32) * w.k_out, X, mm)

    sT_r[...] = lax.fori_loop(0, NC, body, s0_r[...])


def walk_forward(p: Problem, x, xw, s0, *, delta: bool, config: ChunkedConfig, interpret: bool):
    """The forward state walk. ``x``: V (linear attention) or U (delta rule), (BH, Tp,
    d_v); ``xw``: Wk (BH, Tp, d_k) for the delta rule, else None. Returns (the incoming
    state of every chunk (BH, NC, d_k, d_v) in the matmul dtype, X (the delta errors,
    (BH, Tp, d_v) in the matmul dtype; None for linear attention), the final state)."""
    BH, NC, L = p.rows, p.n_chunks, p.L
    Tp, dk, dv = NC * L, p.d_k, p.d_v
    bv = walk_block(BH, dv, config)
    mm, _ = matmuls(p.q.dtype, interpret)
    qk = qk_row(p)
    keys = pl.BlockSpec((None, Tp, dk), lambda b, j: (qk(b), 0, 0))
    seq = pl.BlockSpec((None, Tp, dk), lambda b, j: (b, 0, 0))
    vcols = pl.BlockSpec((None, Tp, bv), lambda b, j: (b, 0, j))
    gates = pl.BlockSpec((None, NC, L, GATE_COLS), lambda b, j: (b, 0, 0, 0))
    tile = pl.BlockSpec((None, dk, bv), lambda b, j: (b, 0, j))
    states = pl.BlockSpec((None, NC, dk, bv), lambda b, j: (b, 0, 0, j))
    kw = dict(L=L, NC=NC, delta=delta, mm=mm)
    if delta:
        in_specs, args = [vcols, keys, seq, gates, tile], [x, p.k, xw, p.gcol, s0]
        out_specs = [states, vcols, tile]
        out_shape = [jax.ShapeDtypeStruct((BH, NC, dk, dv), mm.dtype), jax.ShapeDtypeStruct((BH, Tp, dv), mm.dtype),
                     jax.ShapeDtypeStruct((BH, dk, dv), F32)]
        kernel = functools.partial(_walk_kernel, **kw)
    else:
        in_specs, args = [vcols, keys, gates, tile], [x, p.k, p.gcol, s0]
        out_specs = [states, tile]
        out_shape = [jax.ShapeDtypeStruct((BH, NC, dk, dv), mm.dtype), jax.ShapeDtypeStruct((BH, dk, dv), F32)]

        def kernel(x_r, k_r, gc_r, s0_r, st_r, sT_r):
            _walk_kernel(x_r, k_r, None, gc_r, s0_r, st_r, None, sT_r, **kw)

    outs = pl.pallas_call(
        kernel, grid=(BH, dv // bv), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(interpret, config.walk_warps, config.num_stages), interpret=interpret,
    )(*args)
    return (outs[0], outs[1], outs[2]) if delta else (outs[0], None, outs[1])


def _walk_back_kernel(q_r, k_r, do_r, xw_r, x0_r, gc_r, ds_r, dst_r, dx_r, ds0_r, *, L, NC, scale, delta, mm):
    """The adjoint walk (see :func:`walk_backward`)."""

    def body(j, dS):
        c = NC - 1 - j
        dst_r[c] = dS.astype(dst_r.dtype)
        t = pl.ds(pl.multiple_of(c * L, L), L)
        w = chunk_weights(gc_r, L, c)
        dO = do_r[t, :]
        new = w.a * dS + dot_tn(q_r[t, :].astype(F32) * (w.q_in * scale), dO, mm)
        if delta:
            dX = x0_r[t, :].astype(F32) + dot(k_r[t, :].astype(F32) * w.k_out, dS, mm)
            dx_r[t, :] = dX.astype(dx_r.dtype)
            new = new - dot_tn(xw_r[t, :], dX, mm)
        return new

    ds0_r[...] = lax.fori_loop(0, NC, body, ds_r[...])


def walk_backward(p: Problem, do, xw, x0, dS_T, *, scale: float, delta: bool, config: ChunkedConfig, interpret: bool):
    """The adjoint walk from the last chunk: ``dS_in = a dS_out + (scale q q_in)^T dO``, and
    for the delta rule ``dX = P^T dO + (k k_out) dS_out`` (``x0`` = P^T dO, (BH, Tp, d_v))
    and ``dS_in -= Wk^T dX`` (``xw`` = Wk). Returns (every chunk's outgoing-state gradient
    (BH, NC, d_k, d_v) in the matmul dtype, dX (BH, Tp, d_v) float32 or None, the initial
    state's gradient (BH, d_k, d_v))."""
    BH, NC, L = p.rows, p.n_chunks, p.L
    Tp, dk, dv = NC * L, p.d_k, p.d_v
    bv = walk_block(BH, dv, config)
    mm, _ = matmuls(p.q.dtype, interpret)
    qk = qk_row(p)
    keys = pl.BlockSpec((None, Tp, dk), lambda b, j: (qk(b), 0, 0))
    seq = pl.BlockSpec((None, Tp, dk), lambda b, j: (b, 0, 0))
    vcols = pl.BlockSpec((None, Tp, bv), lambda b, j: (b, 0, j))
    tile = pl.BlockSpec((None, dk, bv), lambda b, j: (b, 0, j))
    gates = pl.BlockSpec((None, NC, L, GATE_COLS), lambda b, j: (b, 0, 0, 0))
    if delta:
        in_specs, args = [keys, keys, vcols, seq, vcols, gates, tile], [p.q, p.k, do, xw, x0, p.gcol, dS_T]
        out_specs = [pl.BlockSpec((None, NC, dk, bv), lambda b, j: (b, 0, 0, j)), vcols, tile]
        out_shape = [jax.ShapeDtypeStruct((BH, NC, dk, dv), mm.dtype), jax.ShapeDtypeStruct((BH, Tp, dv), F32),
                     jax.ShapeDtypeStruct((BH, dk, dv), F32)]
        kernel = functools.partial(_walk_back_kernel, L=L, NC=NC, scale=scale, delta=True, mm=mm)
    else:
        in_specs, args = [keys, vcols, gates, tile], [p.q, do, p.gcol, dS_T]
        out_specs = [pl.BlockSpec((None, NC, dk, bv), lambda b, j: (b, 0, 0, j)), tile]
        out_shape = [jax.ShapeDtypeStruct((BH, NC, dk, dv), mm.dtype), jax.ShapeDtypeStruct((BH, dk, dv), F32)]

        def kernel(q_r, do_r, gc_r, ds_r, dst_r, ds0_r):
            _walk_back_kernel(q_r, None, do_r, None, None, gc_r, ds_r, dst_r, None, ds0_r, L=L, NC=NC, scale=scale,
                              delta=False, mm=mm)

    outs = pl.pallas_call(
        kernel, grid=(BH, dv // bv), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(interpret, config.walk_warps, config.num_stages), interpret=interpret,
    )(*args)
    return (outs[0], outs[1], outs[2]) if delta else (outs[0], None, outs[1])


def chunk_specs(p: Problem):
    """BlockSpecs of the per-chunk kernels, grid (BH, NC): program (b, c) runs chunk c of row b;
    ``qk`` reads the inputs q and k (grouped heads: :func:`qk_row`), ``k`` any other (BH, Tp,
    d_k) array."""
    L = p.L
    qk = qk_row(p)
    row = lambda d: pl.BlockSpec((None, L, d), lambda b, c: (b, c, 0))  # noqa: E731
    chunk = lambda *s: pl.BlockSpec((None, None, *s), lambda b, c: (b, c) + (0,) * len(s))  # noqa: E731
    return {"qk": pl.BlockSpec((None, L, p.d_k), lambda b, c: (qk(b), c, 0)),
            "k": row(p.d_k), "v": row(p.d_v), "gc": chunk(L, GATE_COLS), "gr": chunk(GATE_COLS, L),
            "S": chunk(p.d_k, p.d_v), "LL": chunk(L, L), "rows": chunk(GATE_COLS, L)}


def _scores(q_r, k_r, gc_r, gr_r, L, scale, mm):
    """P = scale (q k^T) (.) D, the chunk's decayed causal scores (L, L) float32."""
    return dot_nt(q_r[...], k_r[...], mm) * (decay_mask(gc_r, gr_r, L, strict=False) * scale)


def _out_kernel(q_r, k_r, x_r, gc_r, gr_r, s_r, o_r, *, L, nv, bv, scale, mm):
    P = _scores(q_r, k_r, gc_r, gr_r, L, scale, mm).astype(mm.dtype)
    w = chunk_weights(gc_r, L)
    qs = (q_r[...].astype(F32) * (w.q_in * scale)).astype(mm.dtype)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        o_r[:, vc] = (dot(P, x_r[:, vc], mm) + dot(qs, s_r[:, vc], mm)).astype(o_r.dtype)
        return carry

    lax.fori_loop(0, nv, block, 0)


def outputs(p: Problem, x, states, out_dtype, *, scale: float, delta: bool, config: ChunkedConfig, interpret: bool):
    """o = (scale q q_in) S_in + P X for every chunk, (BH, Tp, d_v) in ``out_dtype``; ``x`` is
    V (linear attention) or the delta errors (``delta``)."""
    BH, NC = p.rows, p.n_chunks
    bv = config.value_block(p.d_v, split=not delta)
    sp = chunk_specs(p)
    return pl.pallas_call(
        functools.partial(_out_kernel, L=p.L, nv=p.d_v // bv, bv=bv, scale=scale, mm=matmuls(p.q.dtype, interpret)[0]),
        grid=(BH, NC), in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"], sp["S"]], out_specs=sp["v"],
        out_shape=jax.ShapeDtypeStruct((BH, NC * p.L, p.d_v), out_dtype),
        compiler_params=compiler_params(interpret, config.num_warps, config.num_stages), interpret=interpret,
    )(p.q, p.k, x, p.gcol, p.grow, states)


def _scores_t_kernel(q_r, k_r, do_r, gc_r, gr_r, o_r, *, L, nv, bv, scale, mm):
    P = _scores(q_r, k_r, gc_r, gr_r, L, scale, mm).astype(mm.dtype)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        o_r[:, vc] = dot_tn(P, do_r[:, vc], mm).astype(o_r.dtype)
        return carry

    lax.fori_loop(0, nv, block, 0)


def scores_t_times(p: Problem, do, *, scale: float, config: ChunkedConfig, interpret: bool):
    """P^T dO for every chunk, (BH, Tp, d_v) float32 (the delta rule's adjoint walk input)."""
    BH, NC = p.rows, p.n_chunks
    bv = config.value_block(p.d_v)
    sp = chunk_specs(p)
    return pl.pallas_call(
        functools.partial(_scores_t_kernel, L=p.L, nv=p.d_v // bv, bv=bv, scale=scale, mm=matmuls(p.q.dtype, interpret)[0]),
        grid=(BH, NC), in_specs=[sp["qk"], sp["qk"], sp["v"], sp["gc"], sp["gr"]], out_specs=sp["v"],
        out_shape=jax.ShapeDtypeStruct((BH, NC * p.L, p.d_v), F32),
        compiler_params=compiler_params(interpret, config.num_warps, config.num_stages), interpret=interpret,
    )(p.q, p.k, do, p.gcol, p.grow)


def _grads_kernel(q_r, k_r, v_r, x_r, do_r, gc_r, gr_r, s_r, ds_r, *rest, L, nv, bv, scale, delta, mm, f32):
    """One chunk's dq, dk, dv and rows (dG, dbeta); see :func:`chunk_grads`.

    Register pressure shapes the order (the first version spilled 5.6 KiB per thread for the
    delta rule at d_k = 128, chunk 64, 8 warps; this one 1.4 KiB, ``ptxas`` for sm_90): two
    passes over the value blocks, the query side (dq, dP) first, dq finished and written before
    the key side (dk, dT, dv) starts; q and k kept in the matmul dtype; ``k_in S`` as ``q_in (k
    S)`` (``q_in`` is a row factor); R read again after the loop; for 16-bit inputs the key-key
    products exact in 16-bit operands (:func:`split_dot`) instead of three-pass TF32."""
    if delta:
        r_r, dx_r, dq_r, dk_r, dv_r, dg_r = rest
    else:
        dq_r, dk_r, dv_r, dg_r = rest
    q, k = q_r[...].astype(mm.dtype), k_r[...].astype(mm.dtype)
    w = chunk_weights(gc_r, L)
    if delta:
        T = r_r[...] * gr_r[ROW_BETA:ROW_BETA + 1, :]
    else:
        P_mm = (dot_nt(q, k, mm) * decay_mask(gc_r, gr_r, L, strict=False) * scale).astype(mm.dtype)
    dims_k = q.shape[1]
    zk = jnp.zeros((L, dims_k), F32)
    z1 = jnp.zeros((L, 1), F32)

    def query_side(j, acc):
        dq, dP, gq, ga = acc
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        S, dO = s_r[:, vc], do_r[:, vc]
        dP = dP + dot_nt(dO, x_r[:, vc], mm)
        dQ = dot_nt(dO, S, mm)
        gq = gq + jnp.sum(q.astype(F32) * dQ, axis=1, keepdims=True)
        ga = ga + jnp.sum(jnp.sum(S.astype(F32) * ds_r[:, vc].astype(F32), axis=1, keepdims=True), axis=0,
                          keepdims=True)
        return dq + dQ, dP, gq, ga

    def key_side(j, acc):
        dk, dT, gko, gki = acc
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        S, dS = s_r[:, vc], ds_r[:, vc]
        dKo = dot_nt(x_r[:, vc], dS, mm)
        dk = dk + w.k_out * dKo
        gko = gko + jnp.sum(k.astype(F32) * dKo, axis=1, keepdims=True)
        if delta:
            dX = dx_r[:, vc]
            E = v_r[:, vc].astype(F32) - w.q_in * dot(k, S, mm)
            dT = dT + dot_nt(dX, E, mm)
            dV = dot_tn(T, dX, f32)
            dv_r[:, vc] = dV.astype(dv_r.dtype)
            dKi = -dot_nt(dV, S, mm)
            dk = dk + w.q_in * dKi
            gki = gki + jnp.sum(k.astype(F32) * dKi, axis=1, keepdims=True)
        else:
            k_out = (k.astype(F32) * w.k_out).astype(mm.dtype)
            dv_r[:, vc] = (dot_tn(P_mm, do_r[:, vc], mm) + dot(k_out, dS, mm)).astype(dv_r.dtype)
        return dk, dT, gko, gki

    zL = jnp.zeros((L, L), F32)
    dq, dP, gq, ga = lax.fori_loop(0, nv, query_side, (zk, zL, z1, jnp.zeros((1, 1), F32)))
    D = decay_mask(gc_r, gr_r, L, strict=False)
    qw = w.q_in * scale
    dPm = dP * D * scale
    dq_r[...] = (dq * qw + dot(dPm, k, mm)).astype(dq_r.dtype)
    gP = dP * (dot_nt(q, k, mm) * D * scale)
    dG = jnp.sum(gP, axis=1, keepdims=True) - row_to_col(jnp.sum(gP, axis=0, keepdims=True), L) + qw * gq
    dk, dT, gko, gki = lax.fori_loop(0, nv, key_side, (dot_tn(dPm, q, mm), zL, z1, z1))
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    gk_out = w.k_out * gko
    dG = dG - gk_out + jnp.where(last, jnp.sum(gk_out, axis=0, keepdims=True) + w.a * ga, 0.0)
    if delta:
        R = r_r[...]
        dG = dG + w.q_in * gki
        beta_r = gr_r[ROW_BETA:ROW_BETA + 1, :]
        dbeta_row = jnp.sum(R * dT, axis=0, keepdims=True)
        dR = dT * beta_r
        Ds = decay_mask(gc_r, gr_r, L, strict=True)
        dN = -dot_nt(dot_tn(R, dR, f32), R, f32) * (Ds > 0.0)
        Kd = dot_nt(k, k, mm) * Ds
        beta_c = gc_r[:, ROW_BETA:ROW_BETA + 1]
        dbeta = jnp.sum(dN * Kd, axis=1, keepdims=True) + row_to_col(dbeta_row, L)
        dKd = beta_c * dN
        M = dKd * Ds
        dk = dk + split_dot(M, k, ((1,), (0,)), mm) + split_dot(M, k, ((0,), (0,)), mm)
        gK = dKd * Kd
        dG = dG + jnp.sum(gK, axis=1, keepdims=True) - row_to_col(jnp.sum(gK, axis=0, keepdims=True), L)
        dg_r[1:2, :] = col_to_row(dbeta, L)
    dk_r[...] = dk.astype(dk_r.dtype)
    dg_r[0:1, :] = col_to_row(dG, L)


def chunk_grads(p: Problem, x, do, states, dstates, *, scale: float, delta: bool, R=None, dx=None,
                config: ChunkedConfig, interpret: bool):
    """dq, dk, dv ((BH, Tp, d), float32; dq and dk per value head, also for grouped q/k heads)
    and (BH, NC, 2, L) rows (dG, dbeta) for every chunk,
    given each chunk's incoming state ``states`` and outgoing-state gradient ``dstates``;
    ``x`` is V (linear attention) or the delta errors; the delta rule also takes each
    chunk's ``R = (I + N)^-1`` and ``dx`` = dL/dX from the adjoint walk."""
    BH, NC, L = p.rows, p.n_chunks, p.L
    Tp = NC * L
    bv = config.value_block(p.d_v, split=not delta)
    sp = chunk_specs(p)
    in_specs = [sp["qk"], sp["qk"], sp["v"], sp["v"], sp["v"], sp["gc"], sp["gr"], sp["S"], sp["S"]]
    args = [p.q, p.k, p.v, x, do, p.gcol, p.grow, states, dstates]
    if delta:
        in_specs += [sp["LL"], sp["v"]]
        args += [R, dx]
    mm, f32 = matmuls(p.q.dtype, interpret, config)
    return pl.pallas_call(
        functools.partial(_grads_kernel, L=L, nv=p.d_v // bv, bv=bv, scale=scale, delta=delta, mm=mm, f32=f32),
        grid=(BH, NC), in_specs=in_specs,
        out_specs=[sp["k"], sp["k"], sp["v"], sp["rows"]],
        out_shape=[jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32), jax.ShapeDtypeStruct((BH, NC, GATE_COLS, L), F32)],
        compiler_params=compiler_params(interpret, config.bwd_warps, grads_stages(p, config)), interpret=interpret,
    )(*args)


def grads_stages(p: Problem, config: ChunkedConfig) -> int:
    """The per-chunk gradient kernel's pipeline stages: ``config.num_stages``, but one for
    float32 operands, whose three-pass TF32 products stage hi and lo halves of every operand
    in shared memory: the delta rule's kernel at d_k = d_v = 128 needs 320 KiB at two stages
    and 224 KiB at one (Triton 3.9 for sm_90, compiled on the CPU), and Hopper has 227 KiB.
    On the H100, jax 0.11.2's Triton asked 256 KiB for it at one stage, so the delta rule runs
    float32 at d_k 128 in chunks of 32 (:func:`mnemax.kernels.delta_rule.gpu.chunk_for`)."""
    return 1 if p.q.dtype == F32 else config.num_stages
