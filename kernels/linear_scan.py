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
the inputs' promoted dtype. The Pallas backends read bf16 inputs as bf16 (half the
bytes) and carry the state in float32.

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
from .checks import bool_resets, float_array

OP = "linear_scan"


def _compute_dtype(*dtypes) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _prepare(a, b, h0, resets):
    """Validates shapes; returns a (broadcast), b, h0, resets as compute-dtype arrays."""
    b = float_array("b", b, complex_ok=True)
    a = float_array("a", a, complex_ok=True)
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
    a = jnp.broadcast_to(a, b.shape)
    state_shape = (b.shape[0],) + b.shape[2:]
    if h0 is not None:
        h0 = float_array("h0", h0, complex_ok=True)
        if h0.shape != state_shape:
            raise ValueError(
                f"h0 must have shape (batch, ...) = {state_shape}, got shape {h0.shape}"
            )
        h0 = h0.astype(cdt)
    resets = bool_resets(resets, *b.shape[:2])
    return a, b, h0, resets, out_dtype, cdt


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
    a, b, h0, resets, out_dtype, cdt = _prepare(a, b, h0, resets)
    name, impl = dispatch.resolve(OP, backend)
    if name.startswith("pallas"):
        h = impl(a, b, h0=h0, resets=resets, reverse=reverse, compute_dtype=cdt, interpret=dispatch.interpret_flag(interpret))
    else:
        h = impl(a.astype(cdt), b.astype(cdt), h0=h0, resets=resets, reverse=reverse)
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


def fold_resets(a, resets, reverse):
    """Folds ``resets`` into the decays: the carry into a cut step is multiplied by 0."""
    if resets is None:
        return a
    keep = 1.0 - _expand(carry_mask(resets, reverse), a.ndim).astype(a.dtype)
    return a * keep


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def scan_with_vjp(a, b, h0, reverse, impl=_assoc_impl):
    """The bare recurrence from state ``h0``, with the reverse-scan adjoint as its VJP.

    ``impl(a, b, h0, reverse)`` computes the scan (XLA's associative scan or a Pallas
    kernel) and returns ``b``'s dtype; the backward pass calls the same ``impl`` in the
    other direction on the cotangents, in ``h0``'s (compute) dtype:
    ``lambda_t = g_t + a_{t+1} lambda_{t+1}``, ``da_t = lambda_t h_{t-1}``,
    ``db_t = lambda_t``, ``dh0 = a_first lambda_first``.
    """
    return impl(a, b, h0, reverse)


def _scan_fwd(a, b, h0, reverse, impl):
    h = impl(a, b, h0, reverse)
    return h, (a, h, h0, jnp.zeros((0,), b.dtype))


def shifted(x, reverse, fill=None):
    """x shifted by one step against the scan direction; ``fill`` (batch, ...) or zeros
    at the boundary. Forward: out[t] = x[t + 1]. Reverse: out[t] = x[t - 1]."""
    pad = jnp.zeros_like(x[:, :1]) if fill is None else fill[:, None].astype(x.dtype)
    if reverse:
        return jnp.concatenate([pad, x[:, :-1]], axis=1)
    return jnp.concatenate([x[:, 1:], pad], axis=1)


def _scan_bwd(reverse, impl, res, g):
    a, h, h0, b_proto = res
    cdt = h0.dtype
    lam = impl(shifted(a, reverse), g.astype(cdt), jnp.zeros_like(h0), not reverse).astype(cdt)
    # h_{t-1} (forward) or h_{t+1} (reverse), h0 at the boundary.
    h_prev = shifted(h.astype(cdt), not reverse, fill=h0)
    edge = -1 if reverse else 0
    dh0 = a[:, edge].astype(cdt) * lam[:, edge]
    return (lam * h_prev).astype(a.dtype), lam.astype(b_proto.dtype), dh0


scan_with_vjp.defvjp(_scan_fwd, _scan_bwd)


def _zeros_state(b, h0, dtype):
    return jnp.zeros((b.shape[0],) + b.shape[2:], dtype) if h0 is None else h0.astype(dtype)


@dispatch.register(OP, "xla")
def _xla(a, b, *, h0, resets, reverse):
    a = fold_resets(a, resets, reverse)
    return scan_with_vjp(a, b, _zeros_state(b, h0, b.dtype), reverse)


# ----------------------------------------------------------------------------- pallas


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def pallas_scan(a, b, h0, reverse, platform, interpret):
    """The recurrence from the float32 state ``h0`` with a Pallas kernel; its VJP is the
    fused backward kernel (recompute from saved chunk-boundary carries, then the
    adjoint scan)."""
    from . import pallas_linear_scan as pls

    h, _ = pls.scan_forward(platform, a, b, h0, reverse=reverse, interpret=_interp(platform, interpret))
    return h


def _interp(platform, interpret):
    if interpret and platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return bool(interpret)


def _pallas_fwd(a, b, h0, reverse, platform, interpret):
    from . import pallas_linear_scan as pls

    h, bounds = pls.scan_forward(platform, a, b, h0, reverse=reverse, save_bounds=True, interpret=_interp(platform, interpret))
    return h, (a, b, bounds)


def _pallas_bwd(reverse, platform, interpret, res, g):
    from . import pallas_linear_scan as pls

    a, b, bounds = res
    return pls.scan_backward(platform, a, b, g, bounds, reverse=reverse, interpret=_interp(platform, interpret))


pallas_scan.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas(platform, a, b, h0, resets, reverse, compute_dtype, interpret):
    if jnp.issubdtype(compute_dtype, jnp.complexfloating) or jnp.dtype(compute_dtype) == jnp.float64:
        # The kernels carry float32; other dtypes take the XLA path.
        return _xla(a.astype(compute_dtype), b.astype(compute_dtype), h0=h0, resets=resets, reverse=reverse)
    a = fold_resets(a, resets, reverse)
    return pallas_scan(a, b, _zeros_state(b, h0, jnp.float32), reverse, platform, bool(interpret))


@dispatch.register(OP, "pallas_gpu")
def _pallas_gpu(a, b, *, h0, resets, reverse, compute_dtype=jnp.float32, interpret=False):
    return _pallas("gpu", a, b, h0, resets, reverse, compute_dtype, interpret)


@dispatch.register(OP, "pallas_tpu")
def _pallas_tpu(a, b, *, h0, resets, reverse, compute_dtype=jnp.float32, interpret=False):
    return _pallas("tpu", a, b, h0, resets, reverse, compute_dtype, interpret)
