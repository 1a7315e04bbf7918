"""The mLSTM's recurrent form (the sequential ground truth, and the one-step update) and
its quadratic parallel form.

Recurrent, per step (the equations of :mod:`mnemax.kernels.mlstm`)::

    (C, n, m) <- (0, 0, 0) where resets_t                         a fresh state
    m_t = max(log sigma(f~_t) + m, i~_t)
    C_t = exp(log sigma(f~_t) + m - m_t) C + exp(i~_t - m_t) k_t v_t^T     (n alike with k_t)
    h_t = (s q_t)^T C_t / (max(|(s q_t)^T n_t|, exp(-m_t)) + eps)

:func:`recurrent` scans :func:`step` over time (``backend="reference"``);
:func:`one_step` applies it once, the closed form every backend takes for a one-step
call (generation): no padding to a chunk, no kernel launch.

Parallel (``backend="parallel"``, tests and short sequences): with ``F`` the cumulative
log-forget sum, ``D_ts = exp(F_t - F_s + i~_s - m_t)`` on the causal mask (cut at resets),
``h = ((s Q K^T) * D) V / normaliser``: one T x T decay matrix per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .common import NEG_INF, MLSTMState, normalise, stabiliser_max


def step(state: MLSTMState, q_t, k_t, v_t, i_t, logf_t, cut_t, *, eps, scale):
    """One step from ``state``: q_t, k_t (B, H, d_qk), v_t (B, H, d_v), i_t and the
    log-forget gate logf_t (B, H), cut_t (B,) bool (a reset before this step). Returns
    (the new state, h_t (B, H, d_v))."""
    C, n, m = state
    # A reset replaces the incoming state by the fresh (zero) one.
    C = jnp.where(cut_t[:, None, None, None], 0.0, C)
    n = jnp.where(cut_t[:, None, None], 0.0, n)
    m = jnp.where(cut_t[:, None], 0.0, m)
    m_new = jnp.maximum(logf_t + m, i_t)
    f_act = jnp.exp(logf_t + m - m_new)
    i_act = jnp.exp(i_t - m_new)
    C = f_act[..., None, None] * C + i_act[..., None, None] * (k_t[..., :, None] * v_t[..., None, :])
    n = f_act[..., None] * n + i_act[..., None] * k_t
    qs = q_t * scale
    num = jnp.einsum("bhd,bhdv->bhv", qs, C)
    den = jnp.einsum("bhd,bhd->bh", qs, n)
    return MLSTMState(C, n, m_new), normalise(num, den, m_new, eps)


def recurrent(q, k, v, i, f, state, resets, *, chunk_size, eps, scale):
    """``lax.scan`` of :func:`step` over time, in the gates' dtype (float32 or float64)."""
    del chunk_size
    cdt = i.dtype
    batch, _, time, _ = q.shape
    cut = jnp.zeros((batch, time), bool) if resets is None else resets
    xs = (
        jnp.moveaxis(q.astype(cdt), 2, 0),
        jnp.moveaxis(k.astype(cdt), 2, 0),
        jnp.moveaxis(v.astype(cdt), 2, 0),
        jnp.moveaxis(i, 2, 0),
        jnp.moveaxis(jax.nn.log_sigmoid(f), 2, 0),
        jnp.moveaxis(cut, 1, 0),
    )

    def body(carry, x):
        return step(carry, *x, eps=eps, scale=scale)

    final, hs = lax.scan(body, MLSTMState(*state), xs)
    return jnp.moveaxis(hs, 0, 2), final


def one_step(q, k, v, i, f, state, resets, *, eps, scale):
    """A one-step call (time == 1) in closed form: :func:`step` once."""
    cdt = i.dtype
    cut = jnp.zeros((q.shape[0],), bool) if resets is None else resets[:, 0]
    new, h = step(MLSTMState(*state), q[:, :, 0].astype(cdt), k[:, :, 0].astype(cdt), v[:, :, 0].astype(cdt),
                  i[:, :, 0], jax.nn.log_sigmoid(f[:, :, 0]), cut, eps=eps, scale=scale)
    return h[:, :, None], new


def parallel(q, k, v, i, f, state, resets, *, chunk_size, eps, scale):
    """The quadratic form over the whole sequence (one T x T decay matrix per head)."""
    del chunk_size
    cdt = i.dtype
    batch, _, time, _ = q.shape
    q, k, v = (a.astype(cdt) for a in (q, k, v))
    logf = jax.nn.log_sigmoid(f)
    F = jnp.cumsum(logf, axis=-1)  # (B, H, T)
    if resets is None:
        seg = jnp.zeros((batch, 1, time), jnp.int32)
        gate_for_m = i
    else:
        seg = jnp.cumsum(resets.astype(jnp.int32), axis=1)[:, None, :]
        # The fresh state at a reset contributes the candidate log sigma(f~_r) (+ later log-forgets).
        gate_for_m = jnp.where(resets[:, None, :], jnp.maximum(i, logf), i)
    t_idx = jnp.arange(time)
    mask = (t_idx[None, :] <= t_idx[:, None]) & (seg[..., :, None] == seg[..., None, :])  # (B, 1|H, T, T)
    decay = F[..., :, None] - F[..., None, :]
    log_d = jnp.where(mask, decay + i[..., None, :], NEG_INF)
    log_g = jnp.where(mask, decay + gate_for_m[..., None, :], NEG_INF)
    # The incoming state reaches step t unless a reset came in between.
    log_a = jnp.where(seg == 0, F + state.m[..., None], NEG_INF)  # (B, H, T)
    m = jnp.maximum(log_a, stabiliser_max(log_g))
    d = jnp.exp(log_d - m[..., None])
    w = jnp.exp(log_a - m)
    qs = q * scale
    s = jnp.einsum("bhtd,bhsd->bhts", qs, k) * d
    num = jnp.einsum("bhts,bhsv->bhtv", s, v) + w[..., None] * jnp.einsum("bhtd,bhdv->bhtv", qs, state.C)
    den = jnp.sum(s, axis=-1) + w * jnp.einsum("bhtd,bhd->bht", qs, state.n)
    # XLA:CPU (jax 0.11.2) miscompiles the division fused onto the einsums above for
    # several heads at T >= 1024 (outputs ~1e30, each head alone is right): keep num whole.
    num = lax.optimization_barrier(num)
    h = normalise(num, den, m, eps)
    d_last, w_last = d[..., -1, :], w[..., -1]
    C = w_last[..., None, None] * state.C + jnp.einsum("bhs,bhsd,bhsv->bhdv", d_last, k, v)
    n = w_last[..., None] * state.n + jnp.einsum("bhs,bhsd->bhd", d_last, k)
    return h, MLSTMState(C, n, m[..., -1])
