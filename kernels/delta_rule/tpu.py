"""Pallas TPU (Mosaic) kernel for ``delta_rule``'s WY/UT preparation with no decay or one
log decay per head (DeltaNet, Gated DeltaNet); the walks, outputs and per-chunk
gradients it feeds are shared with ``gated_linear_attention`` in
:mod:`mnemax.kernels.chunked_tpu`.

Per chunk (the algebra of :mod:`mnemax.kernels.delta_rule.gpu`), with the strictly lower,
segment-masked ``N = Diag(beta) (K K^T (.) D)``::

    R  = (I + N)^-1 = (I - N)(I + N^2)(I + N^4) ...       N is nilpotent: N^L = 0
    T  = R Diag(beta),   U = T V,   Wk = T (k * exp(G) [no reset yet])

Grid (rows, chunks), both "parallel" (every chunk on its own); blocks per cell: k (L,
d_k), v (L, d_v), the gate tiles (L, 8) and (8, L); out R (L, L), U (L, d_v), Wk (L, d_k),
float32. The doubling product takes ceil(log2 L) - 1 squarings and products of L x L
float32 matrices on the MXU (``L`` any multiple of 8).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from ..chunked_pallas import F32, ROW_BETA, Problem, decay_mask, dot, dot_nt
from ..chunked_tpu import chunk_specs, gate_tiles, interpret_params, matmuls, parallel_params
from .common import unit_lower_inverse


def _wy_kernel(k_r, v_r, gc_r, gr_r, r_r, u_r, wk_r, *, L, f32):
    k = k_r[...].astype(F32)
    gc, gr, w = gate_tiles(gc_r, gr_r, L)
    N = dot_nt(k, k, f32) * decay_mask(gc, gr, L, strict=True) * w.beta
    R = unit_lower_inverse(N, L, f32)
    r_r[...] = R
    T = R * gr[ROW_BETA:ROW_BETA + 1, :]
    wk_r[...] = dot(T, k * w.q_in, f32)
    u_r[...] = dot(T, v_r[...].astype(F32), f32)


def wy(p: Problem, *, interpret: bool):
    """(R (BH, NC, L, L), U (BH, Tp, d_v), Wk (BH, Tp, d_k)), float32, for every chunk."""
    BH, NC, L = p.q.shape[0], p.n_chunks, p.L
    Tp = NC * L
    sp = chunk_specs(p)
    return pl.pallas_call(
        functools.partial(_wy_kernel, L=L, f32=matmuls(p.q.dtype)[1]), name="_tpu_wy_kernel",
        grid=(BH, NC), in_specs=[sp["k"], sp["v"], sp["gc"], sp["gr"]],
        out_specs=[sp["LL"], sp["v"], sp["k"]],
        out_shape=[jax.ShapeDtypeStruct((BH, NC, L, L), F32), jax.ShapeDtypeStruct((BH, Tp, p.d_v), F32),
                   jax.ShapeDtypeStruct((BH, Tp, p.d_k), F32)],
        compiler_params=parallel_params(), interpret=interpret_params(interpret),
    )(p.k, p.v, p.gcol, p.grow)

