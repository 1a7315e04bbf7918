"""Pallas GPU (Triton) kernels for ``delta_rule`` with no decay or one log decay per head
(DeltaNet, Gated DeltaNet): the WY/UT preparation here, the state walks, outputs and
per-chunk gradients shared with ``gated_linear_attention`` in
:mod:`mnemax.kernels.chunked_gpu`.

Per chunk (see :mod:`mnemax.kernels.delta_rule.xla` for the algebra), with the strictly
lower, segment-masked ``N = Diag(beta) (K K^T (.) D)`` and beta folded into the rows::

    R  = (I + N)^-1,   T  = R Diag(beta),   U = T V,   Wk = T (k * exp(G) [no reset yet])

:func:`wy` writes R (float32, kept for the backward), U (float32) and Wk (in the matmul
dtype) for every chunk at once; the forward walk then forms the delta errors
``X = U - Wk S_in`` chunk by chunk. ``R`` is block lower triangular over row blocks of
``ChunkedConfig.wy_rows`` steps (16 by default): each diagonal block by the doubling product
``(I - N)(I + N^2)(I + N^4) ...`` (N is nilpotent), the blocks below it by block forward
substitution, every step a tensor-core matmul (no sequential substitution over rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..chunked_gpu import ChunkedConfig, chunk_specs, compiler_params, matmuls
from ..chunked_pallas import F32, ROW_BETA, ROW_G, ROW_SEG, Matmul, Problem, dot, dot_nt, pow2, split_dot
from .common import unit_lower_inverse

# The largest chunk x padded d_k of these kernels for float32 operands: the per-chunk gradient
# kernel stages hi and lo halves of every float32 operand (three-pass TF32) in shared memory, and
# at chunk 64 x d_k 128 it asked an H100 (jax 0.11.2's Triton) for 256 KiB, past the 227 KiB a
# block may have; at chunk 32 it compiles and equals ``reference`` (benchmarks/RESULTS.md,
# 2026-12-07). The per-channel kernels (KDA) tile d_k and compile at chunk 64.
F32_CHUNK_AREA = 64 * 64


def chunk_for(chunk_size: int, dtype, d_k: int) -> int:
    """The chunk these kernels run at: ``chunk_size``, but for float32 operands at most
    :data:`F32_CHUNK_AREA` / (d_k padded to a power of two), and never below 16 (d_k 128: 32;
    d_k 256: 16). A smaller chunk changes only the rounding, not what is computed."""
    if jnp.dtype(dtype) != F32:
        return chunk_size
    return min(chunk_size, max(16, F32_CHUNK_AREA // pow2(d_k)))


def block_inverse(N, nb: int, b: int, f32: Matmul):
    """The blocks ``R[i, j]`` (b, b), j <= i, of ``(I + N)^-1`` for a strictly lower triangular
    ``N`` of ``nb`` x ``nb`` blocks, ``N(i, j)`` (j <= i) giving block (i, j) (each asked for
    once, in row order): ``R_ii = (I + N_ii)^-1`` (:func:`~.common.unit_lower_inverse`) and, by block
    forward substitution, ``R_ij = -R_ii sum_{j <= m < i} N_im R_mj``; every product at the
    float32 policy ``f32``."""
    R = {}
    for i in range(nb):
        row = [N(i, j) for j in range(i + 1)]
        R[i, i] = unit_lower_inverse(row[i], b, f32)
        for j in range(i):
            acc = dot(row[j], R[j, j], f32)
            for m in range(j + 1, i):
                acc = acc + dot(row[m], R[m, j], f32)
            R[i, j] = -dot(R[i, i], acc, f32)
    return R


def write_blocks(r_r, R, nb: int, b: int):
    """Stores :func:`block_inverse`'s blocks into the (nb b, nb b) ref ``r_r``, zero above."""
    zero = jnp.zeros((b, b), F32)
    for i in range(nb):
        for j in range(nb):
            r_r[i * b:(i + 1) * b, j * b:(j + 1) * b] = R[i, j] if j <= i else zero


def _block_decay(gc_r, gr_r, i: int, j: int, b: int):
    """(b, b) ``exp(G_t - G_s)`` for t in row block ``i`` and s < t in column block ``j <= i``
    of the chunk, in one segment, else 0."""
    rows, cols = slice(i * b, (i + 1) * b), slice(j * b, (j + 1) * b)
    mask = gc_r[rows, ROW_SEG:ROW_SEG + 1] == gr_r[ROW_SEG:ROW_SEG + 1, cols]
    if i == j:
        mask = mask & (lax.broadcasted_iota(jnp.int32, (b, b), 1) < lax.broadcasted_iota(jnp.int32, (b, b), 0))
    return jnp.exp(jnp.where(mask, gc_r[rows, ROW_G:ROW_G + 1] - gr_r[ROW_G:ROW_G + 1, cols], -jnp.inf))


def _wy_kernel(k_r, v_r, gc_r, gr_r, r_r, u_r, wk_r, *, L, b, nv, bv, mm, f32):
    """One chunk's R, U and Wk, in row blocks of ``b`` steps (``b = L``: one block).

    With ``N`` in blocks ``N_ij`` (b x b, zero for j > i), ``R = (I + N)^-1`` is block lower
    triangular: ``R_ii = (I + N_ii)^-1`` (:func:`~.common.unit_lower_inverse`, log2(b) - 1 doublings)
    and, by block forward substitution, ``R_ij = -R_ii sum_{j <= m < i} N_im R_mj``. At
    L = 64 in blocks of 16 that is 40 float32 products of 16 x 16 matrices instead of the 10
    of 64 x 64 of one block: 16x fewer operations. Products with k or v take them in the
    matmul dtype, exact for 16-bit inputs: ``k_i k_j^T`` in one 16-bit matmul (exact products,
    float32 sums), ``T V`` and ``T (k q_in)`` as
    :func:`~mnemax.kernels.chunked_pallas.split_dot` of T (with ``q_in``, a factor of k's rows,
    moved onto T's columns); the inverse's products stay at the float32 policy."""
    nb = L // b
    rows = [slice(i * b, (i + 1) * b) for i in range(nb)]
    ks = [k_r[r, :].astype(mm.dtype) for r in rows]
    beta_row = [gr_r[ROW_BETA:ROW_BETA + 1, r] for r in rows]
    q_in_row = [jnp.where(gr_r[ROW_SEG:ROW_SEG + 1, r] == 0.0, jnp.exp(gr_r[ROW_G:ROW_G + 1, r]), 0.0) for r in rows]
    R = block_inverse(lambda i, j: dot_nt(ks[i], ks[j], mm) * _block_decay(gc_r, gr_r, i, j, b)
                      * gc_r[rows[i], ROW_BETA:ROW_BETA + 1], nb, b, f32)
    write_blocks(r_r, R, nb, b)
    T = {(i, j): R[i, j] * beta_row[j] for i in range(nb) for j in range(i + 1)}
    for i in range(nb):
        acc = split_dot(T[i, 0] * q_in_row[0], ks[0], ((1,), (0,)), mm)
        for j in range(1, i + 1):
            acc = acc + split_dot(T[i, j] * q_in_row[j], ks[j], ((1,), (0,)), mm)
        wk_r[rows[i], :] = acc.astype(wk_r.dtype)

    def block(c, carry):
        vc = pl.ds(pl.multiple_of(c * bv, bv), bv)
        vs = [v_r[r, vc].astype(mm.dtype) for r in rows]
        for i in range(nb):
            acc = split_dot(T[i, 0], vs[0], ((1,), (0,)), mm)
            for j in range(1, i + 1):
                acc = acc + split_dot(T[i, j], vs[j], ((1,), (0,)), mm)
            u_r[rows[i], vc] = acc
        return carry

    lax.fori_loop(0, nv, block, 0)


def wy(p: Problem, *, config: ChunkedConfig, interpret: bool):
    """(R (BH, NC, L, L), U (BH, Tp, d_v), Wk (BH, Tp, d_k)) for every chunk: R and U float32, Wk
    in the matmul dtype (the walks' products round it there; half the bytes for 16-bit inputs).
    Grouped keys are read in place (one row per value head)."""
    BH, NC, L = p.rows, p.n_chunks, p.L
    Tp = NC * L
    bv = config.value_block(p.d_v)
    sp = chunk_specs(p)
    mm, f32 = matmuls(p.q.dtype, interpret, config)
    return pl.pallas_call(
        functools.partial(_wy_kernel, L=L, b=config.wy_rows(L), nv=p.d_v // bv, bv=bv, mm=mm, f32=f32),
        grid=(BH, NC), in_specs=[sp["qk"], sp["v"], sp["gc"], sp["gr"]],
        out_specs=[sp["LL"], sp["v"], sp["k"]],
        out_shape=[jax.ShapeDtypeStruct((BH, NC, L, L), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_k), mm.dtype)],
        compiler_params=compiler_params(interpret, config.num_warps, config.num_stages), interpret=interpret,
    )(p.k, p.v, p.gcol, p.grow)
