"""Pallas GPU (Triton) kernels for ``delta_rule`` with no decay or one log decay per head
(DeltaNet, Gated DeltaNet): the WY/UT preparation here, the state walks, outputs and
per-chunk gradients shared with ``gated_linear_attention`` in
:mod:`mnemax.kernels.chunked_gpu`.

Per chunk (see :mod:`mnemax.kernels.delta_rule.xla` for the algebra), with the strictly
lower, segment-masked ``N = Diag(beta) (K K^T (.) D)`` and beta folded into the rows::

    R  = (I + N)^-1 = (I - N)(I + N^2)(I + N^4) ... (I + N^(L/2))     N is nilpotent: N^L = 0
    T  = R Diag(beta),   U = T V,   Wk = T (k * exp(G) [no reset yet])

:func:`wy` writes R (kept for the backward), U and Wk (float32) for every chunk at once;
the forward walk then forms the delta errors ``X = U - Wk S_in`` chunk by chunk. The
inverse's doubling product is log2(L) - 1 squarings and products of L x L float32
matrices, every one a tensor-friendly matmul (no sequential substitution over rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..chunked_gpu import (
    F32,
    ROW_BETA,
    ChunkedConfig,
    Matmul,
    Problem,
    chunk_specs,
    chunk_weights,
    col_to_row,
    compiler_params,
    decay_mask,
    dot,
    dot_nt,
    matmuls,
    split_dot,
)


def unit_lower_inverse(N, L: int, f32: Matmul):
    """(I + N)^-1 for a strictly lower triangular (L, L) ``N`` (L a power of two): the
    product of (I - N) and (I + N^(2^i)) for 2^i < L, which sums (-N)^j for j < L."""
    eye = (lax.broadcasted_iota(jnp.int32, (L, L), 0) == lax.broadcasted_iota(jnp.int32, (L, L), 1)).astype(F32)
    R, power = eye - N, N
    for _ in range(max(0, (L - 1).bit_length() - 1)):
        power = dot(power, power, f32)
        R = R + dot(R, power, f32)
    return R


def _wy_kernel(k_r, v_r, gc_r, gr_r, r_r, u_r, wk_r, *, L, nv, bv, mm, f32):
    """One chunk's R, U and Wk. Products with k or v take them in the matmul dtype, exact for
    16-bit inputs: K K^T in one 16-bit matmul (exact products, float32 sums), T V and T (k q_in)
    as :func:`~mnemax.kernels.chunked_gpu.split_dot` of T (with ``q_in``, a factor of k's rows,
    moved onto T's columns); the inverse's products stay at the float32 policy."""
    k = k_r[...].astype(mm.dtype)
    w = chunk_weights(gc_r, L)
    N = dot_nt(k, k, mm) * decay_mask(gc_r, gr_r, L, strict=True) * w.beta
    R = unit_lower_inverse(N, L, f32)
    r_r[...] = R
    T = R * gr_r[ROW_BETA:ROW_BETA + 1, :]
    wk_r[...] = split_dot(T * col_to_row(w.q_in, L), k, ((1,), (0,)), mm)

    def block(j, carry):
        vc = pl.ds(pl.multiple_of(j * bv, bv), bv)
        u_r[:, vc] = split_dot(T, v_r[:, vc].astype(mm.dtype), ((1,), (0,)), mm)
        return carry

    lax.fori_loop(0, nv, block, 0)


def wy(p: Problem, *, config: ChunkedConfig, interpret: bool):
    """(R (BH, NC, L, L), U (BH, Tp, d_v), Wk (BH, Tp, d_k)), float32, for every chunk."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp = NC * L
    bv = min(p.d_v, config.block_v)
    sp = chunk_specs(p)
    mm, f32 = matmuls(p.q.dtype, interpret)
    return pl.pallas_call(
        functools.partial(_wy_kernel, L=L, nv=p.d_v // bv, bv=bv, mm=mm, f32=f32),
        grid=(BH, NC), in_specs=[sp["k"], sp["v"], sp["gc"], sp["gr"]],
        out_specs=[sp["LL"], sp["v"], sp["k"]],
        out_shape=[jax.ShapeDtypeStruct((BH, NC, L, L), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32)],
        compiler_params=compiler_params(interpret, config.num_warps, config.num_stages), interpret=interpret,
    )(p.k, p.v, p.gcol, p.grow)
