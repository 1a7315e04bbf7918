"""The ``xla`` backend of ``selective_scan``: portable, chunked.

A ``lax.scan`` over chunks of ``chunk_size`` steps (default ``DEFAULT_CHUNK``) carries the
(batch, channels, state) state; inside a chunk, a ``lax.associative_scan`` over the pairs
``(Abar_t, dt_t B_t x_t)`` with the combine ``(a_l, b_l) . (a_r, b_r) = (a_l a_r, a_r b_l +
b_r)``, under ``jax.checkpoint``. Only one chunk of (batch, chunk, channels, state) is
alive at a time, forward and backward; the backward pass saves the chunk-boundary states
and recomputes each chunk. Equations and shapes: :mod:`.common`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .common import compute_dtype, effective_dt, finish

DEFAULT_CHUNK = 64


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


@jax.checkpoint
def _chunk(h, A, inputs):
    """One chunk: h (batch, channels, state) -> (h at the chunk's end, y (batch, L, channels))."""
    x_c, dt_c, B_c, C_c, keep_c = inputs
    decay = jnp.exp(dt_c[..., None] * A) * keep_c[:, :, None, None]  # (batch, L, channels, state)
    drive = (dt_c * x_c)[..., None] * B_c[:, :, None, :]
    drive = drive.at[:, 0].add(decay[:, 0] * h)
    _, hs = lax.associative_scan(_combine, (decay, drive), axis=1)
    return hs[:, -1], jnp.einsum("bldn,bln->bld", hs, C_c)


def scan(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets, return_state, chunk_size):
    """``(y, h_last or None)`` by chunks (module docstring)."""
    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, h0)
    batch, time, channels = x.shape
    state = A.shape[1]
    size = min(chunk_size or DEFAULT_CHUNK, time)
    n_chunks = -(-time // size)
    pad = n_chunks * size - time
    dt_eff = effective_dt(dt, dt_bias, dt_softplus, cdt)
    keep = jnp.ones((batch, time), cdt) if resets is None else 1.0 - resets.astype(cdt)
    # Padded steps have dt = 0 and keep = 1: Abar = 1 and no input, so the state passes
    # through them unchanged and the final state is the state after the last real step.
    xs = [x.astype(cdt), dt_eff, B.astype(cdt), C.astype(cdt), keep]
    if pad:
        xs = [jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2), constant_values=1 if v is keep else 0) for v in xs]
    # (n_chunks, batch, size, ...)
    xs = [jnp.moveaxis(v.reshape((batch, n_chunks, size) + v.shape[2:]), 1, 0) for v in xs]
    h = jnp.zeros((batch, channels, state), cdt) if h0 is None else h0.astype(cdt)
    A = A.astype(cdt)
    h, ys = lax.scan(lambda h, inp: _chunk(h, A, inp), h, tuple(xs))
    y = jnp.moveaxis(ys, 0, 1).reshape(batch, n_chunks * size, channels)[:, :time]
    y = finish(y, x, D, z, cdt)
    return y, (h if return_state else None)
