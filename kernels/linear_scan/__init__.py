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

Backends (:data:`BACKENDS`): ``reference`` (:mod:`.reference`) is a ``lax.scan``
differentiated by JAX; ``xla`` (:mod:`.xla`) is a ``lax.associative_scan`` with a
hand-written VJP (the adjoint of a linear scan is the reverse linear scan of the
cotangents with the coefficients shifted by one); ``pallas_gpu`` (:mod:`.gpu`) and
``pallas_tpu`` (:mod:`.tpu`) are fused kernels wired here as a ``jax.custom_vjp``
(backward: recompute each chunk from the forward's saved chunk-boundary carries, then the
adjoint scan), tuned by a :class:`LinearScanConfig` and run per shard under
``jax.shard_map`` over the mesh axes a :class:`~mnemax.kernels.sharding.KernelSharding`
names (batch, and the first trailing dimension as the channels). Complex and float64
inputs take the ``xla`` path on the Pallas backends.

A call with one time step (generation) takes :func:`.common.one_step`, ``h_1 = a_1 h0 +
b_1`` in a few ``jnp`` ops, on every backend: no padding to a chunk, no kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import dispatch
from ..sharding import KernelSharding, per_shard, plan
from . import gpu, reference, tpu, xla
from .common import OP, LinearScanConfig, config_or_default, fold_resets, one_step, prepare, zeros_state

__all__ = ("BACKENDS", "OP", "LinearScanConfig", "linear_scan")


def _platform(platform: str):
    return gpu if platform == "gpu" else tpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _pallas_scan(a, b, h0, reverse, platform, interpret, config):
    """The recurrence from the float32 state ``h0`` with a Pallas kernel; its VJP is the
    fused backward kernel (recompute from saved chunk-boundary carries, then the
    adjoint scan)."""
    h, _ = _platform(platform).forward(config, a, b, h0, reverse=reverse, interpret=interpret)
    return h


def _pallas_fwd(a, b, h0, reverse, platform, interpret, config):
    h, bounds = _platform(platform).forward(config, a, b, h0, reverse=reverse, save_bounds=True, interpret=interpret)
    return h, (a, b, bounds)


def _pallas_bwd(reverse, platform, interpret, config, res, g):
    a, b, bounds = res
    return _platform(platform).backward(config, a, b, g, bounds, reverse=reverse, interpret=interpret)


_pallas_scan.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas(platform, a, b, *, h0, resets, reverse, config, interpret=False):
    a = fold_resets(a, resets, reverse)
    return _pallas_scan(a, b, zeros_state(b, h0, jnp.float32), reverse, platform, bool(interpret), config)


BACKENDS = dispatch.backends(OP, {
    "reference": reference.scan,
    "xla": xla.scan,
    "pallas_gpu": functools.partial(_pallas, "gpu"),
    "pallas_tpu": functools.partial(_pallas, "tpu"),
})


def linear_scan(
    a,
    b,
    *,
    h0=None,
    resets=None,
    reverse: bool = False,
    backend: str | None = None,
    interpret: bool | None = None,
    config: LinearScanConfig | None = None,
    sharding: KernelSharding | None = None,
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
      config: the Pallas kernels' :class:`LinearScanConfig` (None: the defaults).
      sharding: the mesh axes that split the batch and the first trailing dimension
        (:class:`~mnemax.kernels.sharding.KernelSharding`); needed when a Pallas backend
        runs under a mesh of more than one device (:func:`~mnemax.kernels.sharding.plan`).

    Returns:
      ``h`` with ``b``'s shape and the promoted dtype of ``a`` and ``b``.
    """
    a, b, h0, resets, out_dtype, cdt = prepare(a, b, h0, resets)
    config = config_or_default(config)
    name, impl = BACKENDS.resolve(backend)
    if b.shape[1] == 1:  # one step (generation): the closed form, whatever the backend
        return one_step(a, b, h0, resets, reverse, cdt).astype(out_dtype)
    if name.startswith("pallas") and (jnp.issubdtype(cdt, jnp.complexfloating) or jnp.dtype(cdt) == jnp.float64):
        name, impl = BACKENDS.resolve("xla")  # the kernels carry float32; other dtypes take the XLA path
    if not name.startswith("pallas"):
        return impl(a.astype(cdt), b.astype(cdt), h0=h0, resets=resets, reverse=reverse).astype(out_dtype)

    impl = functools.partial(impl, config=config, interpret=dispatch.interpret_flag(interpret), reverse=reverse)
    heads = b.shape[2] if b.ndim > 2 else None
    split = plan(OP, sharding, b.shape[0], heads)
    if not split.split:
        return impl(a, b, h0=h0, resets=resets).astype(out_dtype)
    # the kernel per (batch, first trailing dimension) shard: see mnemax.kernels.sharding
    P = jax.sharding.PartitionSpec
    rest = (None,) * (b.ndim - 3)
    seq = P(split.rows, None, split.cols, *rest) if b.ndim > 2 else P(split.rows, None)
    state = P(split.rows, split.cols, *rest) if b.ndim > 2 else P(split.rows)

    def run(a, b, h0, resets):
        return impl(a, b, h0=h0, resets=resets)

    args = (a, b, h0, resets)
    return per_shard(run, args, (seq, seq, state, P(split.rows)), seq).astype(out_dtype)
