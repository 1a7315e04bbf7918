"""What every ``delta_rule`` form shares: the input checks and the fresh state.

The recurrence (see :mod:`mnemax.kernels.delta_rule`), per batch row and head::

    S'_t = Diag(exp g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T      S: (d_k, d_v)
    o_t  = S_t^T (scale q_t)
"""

from __future__ import annotations

import jax.numpy as jnp

from ..checks import attention_inputs, bool_resets, chunk_size_int, float_array, matrix_state, scale_or_default

OP = "delta_rule"


def zeros_state(batch: int, heads: int, d_k: int, d_v: int, dtype=jnp.float32):
    """The fresh (all-zero) state, (batch, heads, d_k, d_v)."""
    return jnp.zeros((batch, heads, d_k, d_v), dtype)


def validate(q, k, v, beta, g, state, resets, chunk_size, scale):
    """The inputs as arrays (``g`` None stays None), resets as bool or None and the scale as
    a float; ValueError/TypeError naming the argument on a wrong shape, dtype or value."""
    q, k, v, g = attention_inputs(q, k, v, g)
    beta = float_array("beta", beta)
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must have shape (batch, heads, time) = {q.shape[:3]}, got shape {beta.shape}")
    batch, heads, time, d_k = q.shape
    matrix_state(state, (batch, heads, d_k, v.shape[-1]))
    chunk_size_int(chunk_size)
    return q, k, v, beta, g, bool_resets(resets, batch, time), scale_or_default(scale, d_k)
