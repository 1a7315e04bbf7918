"""What every ``gated_linear_attention`` form shares: the input checks and the fresh state.

The recurrence (see :mod:`mnemax.kernels.gated_linear_attention`), per batch row and head::

    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T        S: (d_k, d_v)
    o_t = S_t^T (scale q_t)
"""

from __future__ import annotations

import jax.numpy as jnp

from ..checks import attention_inputs, bool_resets, chunk_size_int, matrix_state, scale_or_default

OP = "gated_linear_attention"


def zeros_state(batch: int, heads: int, d_k: int, d_v: int, dtype=jnp.float32):
    """The fresh (all-zero) state, (batch, heads, d_k, d_v)."""
    return jnp.zeros((batch, heads, d_k, d_v), dtype)


def validate(q, k, v, g, state, resets, chunk_size, scale):
    """The inputs as arrays (``g`` None stays None), resets as bool or None and the scale as
    a float; ValueError/TypeError naming the argument on a wrong shape, dtype or value.
    ``q`` and ``k`` may have fewer heads than ``v`` (grouped heads), a divisor of them."""
    q, k, v, g = attention_inputs(q, k, v, g, grouped=True)
    batch, heads, time, d_k = v.shape[:3] + q.shape[3:]
    matrix_state(state, (batch, heads, d_k, v.shape[-1]))
    chunk_size_int(chunk_size)
    return q, k, v, g, bool_resets(resets, batch, time), scale_or_default(scale, d_k)
