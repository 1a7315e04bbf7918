"""The ``reference`` backend of ``linear_scan``: a plainly sequential ``lax.scan`` in the
compute dtype, differentiated by JAX, the ground truth every other backend is held to::

    h_t = a_t * (0 if step t is cut else h_{t-1}) + b_t        (reverse: h_{t+1})

Shapes: a, b (batch, time, *rest); h0 (batch, *rest); resets (batch, time) bool (see
:mod:`.common` for where a reset cuts a reverse scan).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .common import carry_mask, expand


def scan(a, b, *, h0, resets, reverse):
    """Every state of the recurrence, one step at a time."""
    batch = b.shape[0]
    state_shape = (batch,) + b.shape[2:]
    h_init = jnp.zeros(state_shape, b.dtype) if h0 is None else h0
    cut = jnp.zeros(b.shape[:2], bool) if resets is None else carry_mask(resets, reverse)
    cut = expand(cut, b.ndim)

    def step(h, inputs):
        a_t, b_t, cut_t = inputs
        h = jnp.where(cut_t, jnp.zeros_like(h), h)
        h = a_t * h + b_t
        return h, h

    xs = (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0), jnp.moveaxis(jnp.broadcast_to(cut, b.shape), 1, 0))
    _, hs = lax.scan(step, h_init, xs, reverse=reverse)
    return jnp.moveaxis(hs, 0, 1)
