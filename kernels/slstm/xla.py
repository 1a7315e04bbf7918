"""The sLSTM in plain XLA (``backend="xla"``): one fused ``lax.scan`` over a packed
``(4, batch, heads, head_dim)`` carry ``[h, c, n, m]``, with the input and bias added
before the loop and resets folded into a multiplicative mask. Per step: the recurrent
product ``R h`` per head and gate, then the equations of :mod:`mnemax.kernels.slstm`
(a state with ``n = 0`` is fresh: ``m_t = i~_t``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .common import SLSTMState, recurrent


def fused(x, R, b, state, resets):
    """One lax.scan over a packed (4, batch, heads, head_dim) carry [h, c, n, m]."""
    batch, time = x.shape[:2]
    pre = jnp.moveaxis(x + b, 1, 0)  # (T, B, 4, H, D): input and bias added outside the loop
    keep = jnp.ones((time, batch), x.dtype) if resets is None else 1.0 - jnp.moveaxis(resets, 1, 0).astype(x.dtype)
    carry0 = jnp.stack(state)

    def step(carry, inp):
        pre_t, keep_t = inp
        carry = carry * keep_t[None, :, None, None]
        h, c, n, m = carry
        gates = pre_t + recurrent(R, h)
        log_f = jax.nn.log_sigmoid(gates[:, 1])
        started = n > 0.0
        m_new = jnp.where(started, jnp.maximum(log_f + m, gates[:, 0]), gates[:, 0])
        f_act = jnp.exp(jnp.where(started, log_f + m - m_new, -jnp.inf))
        i_act = jnp.exp(gates[:, 0] - m_new)
        c_new = f_act * c + i_act * jnp.tanh(gates[:, 2])
        n_new = f_act * n + i_act
        h_new = jax.nn.sigmoid(gates[:, 3]) * (c_new / n_new)
        return jnp.stack([h_new, c_new, n_new, m_new]), h_new

    final, hs = lax.scan(step, carry0, (pre, keep))
    return jnp.moveaxis(hs, 0, 1), SLSTMState(*final)
