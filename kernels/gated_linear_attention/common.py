"""What every ``gated_linear_attention`` form shares: the input checks and the fresh state.

The recurrence (see :mod:`mnemax.kernels.gated_linear_attention`), per batch row and head::

    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T        S: (d_k, d_v)
    o_t = S_t^T (scale q_t)
"""

from __future__ import annotations

import jax.numpy as jnp

from ..checks import attention_inputs, bool_resets, chunk_size_int, float_array, matrix_state, scale_or_default

OP = "gated_linear_attention"


def zeros_state(batch: int, heads: int, d_k: int, d_v: int, dtype=jnp.float32):
    """The fresh (all-zero) state, (batch, heads, d_k, d_v)."""
    return jnp.zeros((batch, heads, d_k, d_v), dtype)


def repeat_heads(x, heads: int):
    """Grouped q or k (batch, heads / rep, time, d_k) -> (batch, heads, time, d_k): head ``j``
    serves value heads ``j * rep ... (j + 1) * rep - 1``."""
    return x if x.shape[1] == heads else jnp.repeat(x, heads // x.shape[1], axis=1)


def validate(q, k, v, g, state, resets, chunk_size, scale):
    """The inputs as arrays (``g`` None stays None), resets as bool or None and the scale as
    a float; ValueError/TypeError naming the argument on a wrong shape, dtype or value.
    ``q`` and ``k`` may have fewer heads than ``v`` (grouped heads), a divisor of them."""
    q, k, v = (float_array(n, a) for n, a in (("q", q), ("k", k), ("v", v)))
    if q.ndim == 4 and v.ndim == 4 and q.shape[1] != v.shape[1] and q.shape[0] == v.shape[0]:
        if q.shape[1] < 1 or v.shape[1] % q.shape[1]:
            raise ValueError(f"q must have as many heads as v ({v.shape[1]}) or a divisor of them (grouped heads), "
                             f"got shape {q.shape} beside v's {v.shape}")
        if k.shape != q.shape:
            raise ValueError(f"k must have q's shape (batch, heads_qk, time, d_k) = {q.shape}, got shape {k.shape}")
        if v.shape[2] != q.shape[2] or q.shape[2] < 1:
            raise ValueError(f"v must have q's batch and time (>= 1): q has shape {q.shape}, v {v.shape}")
        per_head = v.shape[:3]
        if g is not None:
            g = float_array("g", g)
            if g.shape not in (per_head, per_head + q.shape[3:]):
                raise ValueError(
                    f"g must have shape (batch, heads, time) = {per_head} (one log decay per value head) or "
                    f"(batch, heads, time, d_k) = {per_head + q.shape[3:]} (one per key channel), got shape {g.shape}")
    else:
        q, k, v, g = attention_inputs(q, k, v, g)
    batch, heads, time, d_k = v.shape[:3] + q.shape[3:]
    matrix_state(state, (batch, heads, d_k, v.shape[-1]))
    chunk_size_int(chunk_size)
    return q, k, v, g, bool_resets(resets, batch, time), scale_or_default(scale, d_k)
