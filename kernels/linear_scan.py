"""``linear_scan``: the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``.

Shapes: ``b`` is ``(batch, time, *rest)``; ``a`` broadcasts to ``b``; ``h0`` is
``(batch, *rest)``; ``resets`` is ``(batch, time)`` bool. The result has ``b``'s
shape and holds every ``h_t``.

Resets: where ``resets[:, t]`` is True the carried state is cleared before step
``t`` (``h_t = b_t``; ``h0`` is ignored when ``resets[:, 0]``). With
``reverse=True`` the recurrence runs backwards, ``h_t = a_t * h_{t+1} + b_t`` with
``h0`` as the carry into the last step, and it is cut at the same boundaries: the
carry from step ``t`` into ``t - 1`` is dropped where ``resets[:, t]``.

Arithmetic runs in float32 (float64 or complex when the inputs are); the result has
the inputs' promoted dtype.

Backends: ``reference`` is a ``lax.scan`` differentiated by JAX; ``xla`` is a
``lax.associative_scan`` with a hand-written VJP (the adjoint of a linear scan is
the reverse linear scan of the cotangents with the coefficients shifted by one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import dispatch

OP = "linear_scan"


def _compute_dtype(*dtypes) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _prepare(a, b, h0, resets):
    """Validates shapes; returns a (broadcast), b, h0, resets as compute-dtype arrays."""
    b = jnp.asarray(b)
    a = jnp.asarray(a)
    if b.ndim < 2:
        raise ValueError(
            f"b must have shape (batch, time, ...), got shape {b.shape}"
        )
    try:
        shape = jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        shape = None
    if shape != b.shape:
        raise ValueError(
            f"a must broadcast to b's shape {b.shape}, got shape {a.shape}"
        )
    out_dtype = jnp.result_type(a, b)
    cdt = _compute_dtype(a.dtype, b.dtype)
    a = jnp.broadcast_to(a.astype(cdt), b.shape)
    b = b.astype(cdt)
    state_shape = (b.shape[0],) + b.shape[2:]
    if h0 is not None:
        h0 = jnp.asarray(h0)
        if h0.shape != state_shape:
            raise ValueError(
                f"h0 must have shape (batch, ...) = {state_shape}, got shape {h0.shape}"
            )
        h0 = h0.astype(cdt)
    if resets is not None:
        resets = jnp.asarray(resets)
        if resets.shape != b.shape[:2]:
            raise ValueError(
                f"resets must have shape (batch, time) = {b.shape[:2]}, got shape {resets.shape}"
            )
        resets = resets.astype(bool)
    return a, b, h0, resets, out_dtype


def _expand(r, ndim):
    """(batch, time) -> (batch, time, 1, ..., 1) with ``ndim`` dims."""
    return r.reshape(r.shape + (1,) * (ndim - 2))


def carry_mask(resets, reverse: bool):
    """(batch, time) bool: True where step t receives no carry (the recurrence is cut).

    Forward: step t receives no carry where ``resets[:, t]``. Reverse: step t gets
    its carry from t + 1, which is cut where ``resets[:, t + 1]``.
    """
    if not reverse:
        return resets
    return jnp.concatenate([resets[:, 1:], jnp.zeros_like(resets[:, :1])], axis=1)


def linear_scan(
    a, b, *, h0=None, resets=None, reverse: bool = False, backend: str | None = None, interpret: bool | None = None
):
    """All states of ``h_t = a_t * h_{t-1} + b_t`` along axis 1.

    Args:
      a: decay, broadcastable to ``b``'s shape ``(batch, time, ...)``.
      b: input, ``(batch, time, ...)``.
      h0: initial state ``(batch, ...)``; zeros when None.
      resets: ``(batch, time)`` bool; clears the carried state before step t.
      reverse: run from the last step to the first.
      backend: ``"reference"``, ``"xla"``, ``"pallas_gpu"`` or ``"pallas_tpu"``; None
        picks by platform (``MNEMAX_KERNEL_BACKEND`` overrides).
      interpret: run a Pallas backend in interpret mode (on CPU); None reads
        ``MNEMAX_PALLAS_INTERPRET``. Ignored by the other backends.

    Returns:
      ``h`` with ``b``'s shape and the promoted dtype of ``a`` and ``b``.
    """
    a, b, h0, resets, out_dtype = _prepare(a, b, h0, resets)
    name, impl = dispatch.resolve(OP, backend)
    kw = {"interpret": dispatch.interpret_flag(interpret)} if name.startswith("pallas") else {}
    h = impl(a, b, h0=h0, resets=resets, reverse=reverse, **kw)
    return h.astype(out_dtype)


# ----------------------------------------------------------------------------- reference


@dispatch.register(OP, "reference")
def _reference(a, b, *, h0, resets, reverse):
    batch = b.shape[0]
    state_shape = (batch,) + b.shape[2:]
    h_init = jnp.zeros(state_shape, b.dtype) if h0 is None else h0
    cut = (
        jnp.zeros(b.shape[:2], bool) if resets is None else carry_mask(resets, reverse)
    )
    cut = _expand(cut, b.ndim)

    def step(h, inputs):
        a_t, b_t, cut_t = inputs
        h = jnp.where(cut_t, jnp.zeros_like(h), h)
        h = a_t * h + b_t
        return h, h

    xs = (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0), jnp.moveaxis(jnp.broadcast_to(cut, b.shape), 1, 0))
    _, hs = lax.scan(step, h_init, xs, reverse=reverse)
    return jnp.moveaxis(hs, 0, 1)


# ----------------------------------------------------------------------------- xla


def fold_inputs(a, b, h0, resets, reverse):
    """Folds resets into the decays and h0 into the first (last) input.

    Returns ``(a_eff, b_eff)`` such that the plain scan ``h_t = a_eff_t h_{t-1} +
    b_eff_t`` from a zero state gives the same states. Shared by every backend that
    implements the bare recurrence.
    """
    if resets is not None:
        keep = 1.0 - _expand(carry_mask(resets, reverse), a.ndim).astype(a.dtype)
        a = a * keep
    if h0 is not None:
        idx = -1 if reverse else 0
        b = b.at[:, idx].add(a[:, idx] * h0)
    return a, b


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _assoc_scan(a, b, reverse):
    _, h = lax.associative_scan(_combine, (a, b), reverse=reverse, axis=1)
    return h


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def scan_with_vjp(a, b, reverse, impl=_assoc_scan):
    """Bare scan from a zero state, with the reverse-scan adjoint as its VJP.

    ``impl(a, b, reverse)`` computes the scan (XLA's associative scan, or a Pallas
    kernel); the backward pass calls the same ``impl`` in the other direction.
    """
    return impl(a, b, reverse)


def _scan_fwd(a, b, reverse, impl):
    h = impl(a, b, reverse)
    return h, (a, h)


def shifted(x, reverse):
    """x shifted by one step against the scan direction, zero filled.

    Forward: out[t] = x[t + 1]. Reverse: out[t] = x[t - 1].
    """
    pad = jnp.zeros_like(x[:, :1])
    if reverse:
        return jnp.concatenate([pad, x[:, :-1]], axis=1)
    return jnp.concatenate([x[:, 1:], pad], axis=1)


def _scan_bwd(reverse, impl, res, g):
    a, h = res
    # lambda_t = g_t + a_{t+1} lambda_{t+1} (forward case): a scan in the other direction.
    lam = impl(shifted(a, reverse), g.astype(a.dtype), not reverse)
    # h_{t-1} (forward) or h_{t+1} (reverse), zero at the boundary.
    h_prev = shifted(h, not reverse)
    return lam * h_prev, lam


scan_with_vjp.defvjp(_scan_fwd, _scan_bwd)


@dispatch.register(OP, "xla")
def _xla(a, b, *, h0, resets, reverse):
    a, b = fold_inputs(a, b, h0, resets, reverse)
    return scan_with_vjp(a, b, reverse)


# ----------------------------------------------------------------------------- pallas


def _pallas_impl(platform: str, interpret: bool):
    from . import pallas_linear_scan as pls

    if platform == "gpu":
        return _Impl(functools.partial(pls.scan_gpu, interpret=interpret))
    if interpret:
        from jax.experimental.pallas import tpu as pltpu

        return _Impl(functools.partial(pls.scan_tpu, interpret=pltpu.InterpretParams()))
    return _Impl(pls.scan_tpu)


class _Impl:
    """A hashable wrapper (custom_vjp's static argument) around a bare-scan kernel."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, a, b, reverse):
        return self.fn(a, b, reverse=reverse)

    def __hash__(self):
        return hash(repr(self.fn))

    def __eq__(self, other):
        return isinstance(other, _Impl) and repr(self.fn) == repr(other.fn)


@dispatch.register(OP, "pallas_gpu")
def _pallas_gpu(a, b, *, h0, resets, reverse, interpret=False):
    a, b = fold_inputs(a, b, h0, resets, reverse)
    return scan_with_vjp(a, b, reverse, _pallas_impl("gpu", interpret))


@dispatch.register(OP, "pallas_tpu")
def _pallas_tpu(a, b, *, h0, resets, reverse, interpret=False):
    a, b = fold_inputs(a, b, h0, resets, reverse)
    return scan_with_vjp(a, b, reverse, _pallas_impl("tpu", interpret))
