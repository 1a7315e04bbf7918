"""The chunkwise form of ``delta_rule`` in plain XLA (``backend="xla"``), by the WY/UT
representation (Yang et al., 2024, "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length", Section 3; with decays as in Gated DeltaNet and KDA).

Write the step as ``S_t = S'_t + beta_t k_t w_t^T`` with the delta error ``w_t = v_t -
S'_t^T k_t`` and ``S'_t = Diag(exp g_t) S_{t-1}``. Inside a chunk of ``L`` steps, with
``G_t`` the cumulative log decay since its start and ``D_ts = Diag(exp(G_t - G_s))``::

    S'_t = Diag(exp G_t) S_in + sum_{s<t} D_ts k_s beta_s w_s^T

so the errors solve a unit lower-triangular system (the UT transform)::

    (I + M) W = V - K~ S_in,    M_ts = beta_s k_t^T D_ts k_s  (s < t),   K~_t = exp(G_t) * k_t
    W = U - Wk S_in,            U = (I + M)^-1 V,   Wk = (I + M)^-1 K~

and the outputs and the outgoing state are matmuls::

    o_t   = (scale q_t * exp(G_t))^T S_in + sum_{s<=t} (scale q_t)^T D_ts k_s beta_s w_s
    S_out = Diag(exp G_L) S_in + sum_s (exp(G_L - G_s) * k_s) beta_s w_s^T

``U``, ``Wk`` and the decay-weighted score matrices are computed for every chunk at once
(:func:`mnemax.kernels.chunked.decayed_scores`: every exponent <= 0, or for per-channel
decays spanning at most 60 nats in a chunk one factored matmul with factors within
``exp(+-30)``); only ``W = U - Wk
S_in``, the outputs' state term and the state update are carried across chunks by a
``lax.scan``. Resets cut ``M``, the scores and the state terms at their segment
boundaries (padded steps have zero keys, values and ``g = 0``). JAX differentiates the
whole form, the triangular solve included. Arithmetic is in float32 (float64 for
float64 inputs) at full matmul precision.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

from ..chunked import boundary_terms, causal, chunk, decayed_scores, einsum, unchunk


def chunkwise(q, k, v, beta, g, state, resets, *, chunk_size, scale):
    """(o (B, H, T, d_v), final S (B, H, d_k, d_v)); see the module docstring."""
    c = chunk(q, k, v, g, resets, beta, chunk_size=chunk_size, scale=scale, dtype=state.dtype)
    (bc,) = c.extra
    M = decayed_scores(c.k, c.k, c.G, causal(chunk_size, strict=True) & c.seg.same) * bc[..., None, :]
    P = decayed_scores(c.q, c.k, c.G, causal(chunk_size, strict=False) & c.seg.same) * bc[..., None, :]
    q_in, k_in, k_out, decay = boundary_terms(c, c.k * bc[..., None])
    d_v = v.shape[-1]
    UW = solve_triangular(M, jnp.concatenate([c.v, k_in], axis=-1), lower=True, unit_diagonal=True)
    U, Wk = UW[..., :d_v], UW[..., d_v:]
    scan_in = tuple(jnp.moveaxis(a, 2, 0) for a in (U, Wk, q_in, P, k_out, decay))

    def carry(S, x):
        U_n, Wk_n, q_in_n, P_n, k_out_n, decay_n = x
        W = U_n - einsum("bhsd,bhdv->bhsv", Wk_n, S)
        o_n = einsum("bhtd,bhdv->bhtv", q_in_n, S) + einsum("bhts,bhsv->bhtv", P_n, W)
        S = decay_n[..., None] * S + einsum("bhsd,bhsv->bhdv", k_out_n, W)
        return S, o_n

    final, o = lax.scan(carry, state, scan_in)
    return unchunk(jnp.moveaxis(o, 0, 2), c), final
