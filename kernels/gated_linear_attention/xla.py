"""The chunkwise form of ``gated_linear_attention`` in plain XLA (``backend="xla"``).

The sequence is cut into chunks of ``L = chunk_size`` steps (padded with zero keys and
values and ``g = 0``, which leave the state untouched). With ``G_t`` the cumulative log
decay since the chunk's start (:mod:`mnemax.kernels.chunked`), per chunk::

    A_ts   = sum_d (scale q_td) k_sd exp(G_td - G_sd)        s <= t, same segment
    o_t    = sum_s A_ts v_s + (scale q_t * exp(G_t))^T S_in   (the second term only before any reset)
    S_out  = exp(G_L) * S_in + sum_s (k_s * exp(G_L - G_s)) v_s^T
             (S_in's term only without a reset in the chunk; s in the last segment)

Nothing overflows however strong the decay: every exponent is <= 0, except in per-channel
scores whose chunks span at most 60 nats, formed as one factored matmul with factors
within ``exp(+-30)``; stronger per-channel decays take sub-chunks inside ``A``
(:func:`mnemax.kernels.chunked.decayed_scores`). The
states are carried across chunks by a ``lax.scan``; JAX differentiates the whole form.
Arithmetic is in float32 (float64 for float64 inputs) at full matmul precision.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..chunked import boundary_terms, causal, chunk, decayed_scores, einsum, unchunk


def chunkwise(q, k, v, g, state, resets, *, chunk_size, scale):
    """(o (B, H, T, d_v), final S (B, H, d_k, d_v)); see the module docstring."""
    c = chunk(q, k, v, g, resets, chunk_size=chunk_size, scale=scale, dtype=state.dtype)
    A = decayed_scores(c.q, c.k, c.G, causal(chunk_size, strict=False) & c.seg.same)
    o = einsum("bhnts,bhnsv->bhntv", A, c.v)
    q_in, _, k_out, decay = boundary_terms(c, c.k)
    kv = einsum("bhnsd,bhnsv->bhndv", k_out, c.v)

    def carry(S, x):
        decay_n, kv_n = x
        return decay_n[..., None] * S + kv_n, S

    final, S_in = lax.scan(carry, state, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(kv, 2, 0)))
    return unchunk(o + einsum("bhntd,nbhdv->bhntv", q_in, S_in), c), final
