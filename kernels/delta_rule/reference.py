"""The recurrent form of ``delta_rule``: the sequential ground truth (``backend="reference"``)
and the one-step update every backend takes for ``time == 1``.

Per step, per batch row and head::

    S <- 0 where resets_t                            a fresh state
    S' = Diag(exp g_t) S                             (no decay when g is None)
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T         = (I - beta_t k_t k_t^T) S' + beta_t k_t v_t^T
    o_t = S_t^T (scale q_t)
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..chunked import decay_factor

HIGHEST = lax.Precision.HIGHEST


def step(S, q_t, k_t, v_t, beta_t, g_t, cut_t, *, scale):
    """One step: S (B, H, d_k, d_v); q_t, k_t (B, H, d_k); v_t (B, H, d_v); beta_t (B, H);
    g_t (B, H), (B, H, d_k) or None; cut_t (B,) bool. Returns (new S, o_t (B, H, d_v))."""
    S = jnp.where(cut_t[:, None, None, None], 0.0, S)
    if g_t is not None:
        S = decay_factor(g_t, S) * S
    err = v_t - jnp.einsum("bhdv,bhd->bhv", S, k_t, precision=HIGHEST)
    S = S + (beta_t[..., None] * k_t)[..., :, None] * err[..., None, :]
    return S, jnp.einsum("bhd,bhdv->bhv", q_t * scale, S, precision=HIGHEST)


def recurrent(q, k, v, beta, g, state, resets, *, chunk_size, scale):
    """``lax.scan`` of :func:`step` over time in ``state``'s dtype; returns (o, final S)."""
    del chunk_size
    cdt = state.dtype
    batch, _, time, _ = q.shape
    cut = jnp.zeros((batch, time), bool) if resets is None else resets
    xs = [jnp.moveaxis(a.astype(cdt), 2, 0) for a in (q, k, v, beta)] + [jnp.moveaxis(cut, 1, 0)]
    gs = None if g is None else jnp.moveaxis(g.astype(cdt), 2, 0)

    def body(S, x):
        q_t, k_t, v_t, beta_t, cut_t, g_t = x
        return step(S, q_t, k_t, v_t, beta_t, g_t, cut_t, scale=scale)

    final, o = lax.scan(body, state, (*xs, gs))
    return jnp.moveaxis(o, 0, 2), final


def one_step(q, k, v, beta, g, state, resets, *, scale):
    """A one-step call (time == 1) in closed form: :func:`step` once."""
    cdt = state.dtype
    cut = jnp.zeros((q.shape[0],), bool) if resets is None else resets[:, 0]
    g_t = None if g is None else g[:, :, 0].astype(cdt)
    S, o = step(state, *(a[:, :, 0].astype(cdt) for a in (q, k, v, beta)), g_t, cut, scale=scale)
    return o[:, :, None], S
