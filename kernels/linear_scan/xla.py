"""The ``xla`` backend of ``linear_scan``: ``lax.associative_scan`` over the pairs
``(a_t, b_t)`` with the combine ``(a_l, b_l) . (a_r, b_r) = (a_l a_r, a_r b_l + b_r)``,
resets folded into the decays, and a hand-written VJP: the adjoint of a linear scan is the
reverse linear scan of the cotangents with the coefficients shifted by one::

    lambda_t = g_t + a_{t+1} lambda_{t+1},   da_t = lambda_t h_{t-1},   db_t = lambda_t,
    dh0 = a_first lambda_first

Shapes: a, b (batch, time, *rest); h0 (batch, *rest).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .common import fold_resets, zeros_state


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _assoc_impl(a, b, h0, reverse):
    """XLA's associative scan with the initial state folded into the first input."""
    idx = -1 if reverse else 0
    b = b.at[:, idx].add(a[:, idx] * h0.astype(b.dtype))
    _, h = lax.associative_scan(_combine, (a, b), reverse=reverse, axis=1)
    return h


def shifted(x, reverse, fill=None):
    """x shifted by one step against the scan direction; ``fill`` (batch, ...) or zeros
    at the boundary. Forward: out[t] = x[t + 1]. Reverse: out[t] = x[t - 1]."""
    pad = jnp.zeros_like(x[:, :1]) if fill is None else fill[:, None].astype(x.dtype)
    if reverse:
        return jnp.concatenate([pad, x[:, :-1]], axis=1)
    return jnp.concatenate([x[:, 1:], pad], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scan_with_vjp(a, b, h0, reverse):
    """The bare recurrence from state ``h0`` (XLA's associative scan), with the reverse-scan
    adjoint of the module docstring as its VJP (in ``h0``'s, the compute, dtype)."""
    return _assoc_impl(a, b, h0, reverse)


def _scan_fwd(a, b, h0, reverse):
    h = _assoc_impl(a, b, h0, reverse)
    return h, (a, h, h0, jnp.zeros((0,), b.dtype))


def _scan_bwd(reverse, res, g):
    a, h, h0, b_proto = res
    cdt = h0.dtype
    lam = _assoc_impl(shifted(a, reverse), g.astype(cdt), jnp.zeros_like(h0), not reverse).astype(cdt)
    # h_{t-1} (forward) or h_{t+1} (reverse), h0 at the boundary.
    h_prev = shifted(h.astype(cdt), not reverse, fill=h0)
    edge = -1 if reverse else 0
    dh0 = a[:, edge].astype(cdt) * lam[:, edge]
    return (lam * h_prev).astype(a.dtype), lam.astype(b_proto.dtype), dh0


_scan_with_vjp.defvjp(_scan_fwd, _scan_bwd)


def scan(a, b, *, h0, resets, reverse):
    """Every state of the recurrence (module docstring)."""
    a = fold_resets(a, resets, reverse)
    return _scan_with_vjp(a, b, zeros_state(b, h0, b.dtype), reverse)
