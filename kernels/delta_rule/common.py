"""What every ``delta_rule`` form shares: the input checks and the fresh state; and what its
Pallas kernels (GPU and TPU) share: the chunk's unit lower triangular inverse.

The recurrence (see :mod:`mnemax.kernels.delta_rule`), per batch row and head::

    S'_t = Diag(exp g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T      S: (d_k, d_v)
    o_t  = S_t^T (scale q_t)
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..chunked_pallas import F32, Matmul, dot
from ..checks import attention_inputs, bool_resets, chunk_size_int, float_array, matrix_state, scale_or_default

OP = "delta_rule"


def zeros_state(batch: int, heads: int, d_k: int, d_v: int, dtype=jnp.float32):
    """The fresh (all-zero) state, (batch, heads, d_k, d_v)."""
    return jnp.zeros((batch, heads, d_k, d_v), dtype)


def validate(q, k, v, beta, g, state, resets, chunk_size, scale):
    """The inputs as arrays (``g`` None stays None), resets as bool or None and the scale as
    a float; ValueError/TypeError naming the argument on a wrong shape, dtype or value.
    ``q`` and ``k`` may have fewer heads than ``v`` (grouped heads), a divisor of them."""
    q, k, v, g = attention_inputs(q, k, v, g, grouped=True)
    beta = float_array("beta", beta)
    batch, heads, time, d_k = v.shape[:3] + q.shape[3:]
    if beta.shape != (batch, heads, time):
        raise ValueError(f"beta must have shape (batch, heads, time) = {(batch, heads, time)}, got shape {beta.shape}")
    matrix_state(state, (batch, heads, d_k, v.shape[-1]))
    chunk_size_int(chunk_size)
    return q, k, v, beta, g, bool_resets(resets, batch, time), scale_or_default(scale, d_k)


# ----------------------------------------------------------------------------- in-kernel math


def unit_lower_inverse(N, L: int, f32: Matmul):
    """(I + N)^-1 for a strictly lower triangular (L, L) ``N`` (L a power of two): the
    product of (I - N) and (I + N^(2^i)) for 2^i < L, which sums (-N)^j for j < L."""
    eye = (lax.broadcasted_iota(jnp.int32, (L, L), 0) == lax.broadcasted_iota(jnp.int32, (L, L), 1)).astype(F32)
    R, power = eye - N, N
    for _ in range(max(0, (L - 1).bit_length() - 1)):
        power = dot(power, power, f32)
        R = R + dot(R, power, f32)
    return R
