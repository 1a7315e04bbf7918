"""The sLSTM recurrence as a plain ``lax.scan`` of its equations (``backend="reference"``,
float32): the ground truth, and the one-step update.

Per step (the equations of :mod:`mnemax.kernels.slstm`)::

    (h, c, n, m) <- 0 where resets_t                                    a fresh state
    (i~, f~, z~, o~) = x_t + R h + b
    m_t = i~ if n == 0 else max(log sigma(f~) + m, i~)
    c_t = f' c + i' tanh(z~),  n_t = f' n + i',  h_t = sigma(o~) c_t / n_t

:func:`one_step` applies :func:`step` once: the closed form every backend takes for a
one-step call (generation), with no kernel launch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .common import SLSTMState, recurrent


def step(st: SLSTMState, x_t, cut_t, R, b):
    """One step from ``st``: x_t (B, 4, H, D) input pre-activations, cut_t (B,) bool (a
    reset before this step). Returns (the new state, h_t (B, H, D))."""
    st = SLSTMState(*(jnp.where(cut_t[:, None, None], 0.0, s) for s in st))
    h, c, n, m = st
    raw = x_t + recurrent(R, h) + b
    i_pre, f_pre, z_pre, o_pre = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
    log_f = jax.nn.log_sigmoid(f_pre)
    fresh = n == 0.0
    m_new = jnp.where(fresh, i_pre, jnp.maximum(log_f + m, i_pre))
    i_act = jnp.exp(i_pre - m_new)
    # On a fresh state f' multiplies zeros; keep its exponent finite for the gradient.
    f_act = jnp.where(fresh, 0.0, jnp.exp(jnp.where(fresh, 0.0, log_f + m - m_new)))
    c_new = f_act * c + i_act * jnp.tanh(z_pre)
    n_new = f_act * n + i_act
    h_new = jax.nn.sigmoid(o_pre) * c_new / n_new
    return SLSTMState(h_new, c_new, n_new, m_new), h_new


def scan(x, R, b, state, resets):
    """``lax.scan`` of :func:`step` over time."""
    batch, time = x.shape[:2]
    cut = jnp.zeros((batch, time), bool) if resets is None else resets

    def body(st, inp):
        return step(st, *inp, R, b)

    final, hs = lax.scan(body, SLSTMState(*state), (jnp.moveaxis(x, 1, 0), jnp.moveaxis(cut, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), final


def one_step(x, R, b, state, resets):
    """A one-step call (time == 1) in closed form: :func:`step` once."""
    cut = jnp.zeros((x.shape[0],), bool) if resets is None else resets[:, 0]
    new, h = step(SLSTMState(*state), x[:, 0], cut, R, b)
    return h[:, None], new
