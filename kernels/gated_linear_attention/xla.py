"""The chunkwise form of ``gated_linear_attention`` in plain XLA (``backend="xla"``).

The sequence is cut into chunks of ``L = chunk_size`` steps (padded with zero keys and
values and ``g = 0``, which leave the state untouched). With ``G_t`` the cumulative log
decay since the chunk's start (:mod:`mnemax.kernels.chunked`), per chunk::

    A_ts   = sum_d (scale q_td) k_sd exp(G_td - G_sd)        s <= t, same segment
    o_t    = sum_s A_ts v_s + (scale q_t * exp(G_t))^T S_in   (the second term only before any reset)
    S_out  = exp(G_L) * S_in + sum_s (k_s * exp(G_L - G_s)) v_s^T
             (S_in's term only without a reset in the chunk; s in the last segment)

Every exponent is <= 0, so nothing overflows however strong the decay; per-channel
decays use sub-chunks inside ``A`` (:func:`mnemax.kernels.chunked.decayed_scores`). The
states are carried across chunks by a ``lax.scan``; JAX differentiates the whole form.
Arithmetic is in float32 (float64 for float64 inputs) at full matmul precision.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..chunked import causal, decayed_scores, einsum, pad_time, segments, to_chunks


def chunkwise(q, k, v, g, state, resets, *, chunk_size, scale):
    """(o (B, H, T, d_v), final S (B, H, d_k, d_v)); see the module docstring."""
    cdt = state.dtype
    B, H, T, _ = q.shape
    L = chunk_size
    N = -(-T // L)
    Tp = N * L
    chunks = lambda a: to_chunks(pad_time(a.astype(cdt), Tp), N, L)  # noqa: E731
    qc, kc, vc = chunks(q) * scale, chunks(k), chunks(v)
    G = jnp.cumsum(chunks(jnp.zeros(q.shape[:3], cdt) if g is None else g), axis=3)  # (B, H, N, L[, d_k])
    seg = segments(None if resets is None else pad_time(resets, Tp, axis=1), B, N, L)
    per_channel = G.ndim == 5
    A = decayed_scores(qc, kc, G, causal(L, strict=False) & seg.same)
    o = einsum("bhnts,bhnsv->bhntv", A, vc)
    G_last = G[:, :, :, -1:]  # (B, H, N, 1[, d_k])
    if not per_channel:
        G, G_last = G[..., None], G_last[..., None]
    q_in = qc * jnp.exp(G) * seg.fresh[..., None]
    k_out = kc * jnp.exp(jnp.where(seg.tail[..., None], G_last - G, -jnp.inf))
    decay = jnp.exp(G_last[:, :, :, 0]) * seg.carries[..., None]  # (B, H, N, 1 | d_k)
    kv = einsum("bhnsd,bhnsv->bhndv", k_out, vc)

    def carry(S, x):
        decay_n, kv_n = x
        return decay_n[..., None] * S + kv_n, S

    final, S_in = lax.scan(carry, state, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(kv, 2, 0)))
    o = o + einsum("bhntd,nbhdv->bhntv", q_in, S_in)
    return o.reshape(B, H, Tp, -1)[:, :, :T], final
