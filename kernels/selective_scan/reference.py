"""The ``reference`` backend of ``selective_scan``: a plainly sequential ``lax.scan`` over
time in the compute dtype, differentiated by JAX, the ground truth every other backend is
held to. Per step (equations in :mod:`.common`)::

    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t        (h cleared before t where resets[:, t])
    y_t = C_t . h_t  (+ D x_t, * silu(z_t))

Shapes: x, dt, z (batch, time, channels); A (channels, state); B, C (batch, time, state);
h (batch, channels, state).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .common import compute_dtype, effective_dt, finish


def scan(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets, return_state, chunk_size):
    """``(y, h_last or None)`` of the recurrence, one step at a time."""
    del chunk_size
    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, h0)
    batch, time, channels = x.shape
    dt = effective_dt(dt, dt_bias, dt_softplus, cdt)
    A = A.astype(cdt)
    h = jnp.zeros((batch, channels, A.shape[1]), cdt) if h0 is None else h0.astype(cdt)
    cut = jnp.zeros((batch, time), bool) if resets is None else resets

    def step(h, inputs):
        x_t, dt_t, B_t, C_t, cut_t = inputs
        h = jnp.where(cut_t[:, None, None], jnp.zeros_like(h), h)
        h = jnp.exp(dt_t[:, :, None] * A) * h + (dt_t * x_t)[:, :, None] * B_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, C_t)

    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (x.astype(cdt), dt, B.astype(cdt), C.astype(cdt), cut))
    h, ys = lax.scan(step, h, xs)
    y = finish(jnp.moveaxis(ys, 0, 1), x, D, z, cdt)
    return y, (h if return_state else None)
