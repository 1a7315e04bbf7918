"""``slstm``: the sLSTM recurrence of xLSTM (Beck et al., 2024, Section 2.2).

Per batch row, head and unit, with input pre-activations ``x = W x_t`` for the gates
``(i, f, z, o)`` and block-diagonal recurrent weights ``R`` (one ``head_dim x head_dim``
block per head and gate)::

    (i~, f~, z~, o~)_t = x_t + R h_{t-1} + b
    m_t  = max(log sigma(f~_t) + m_{t-1}, i~_t)     (m_t = i~_t when n_{t-1} = 0: a fresh state)
    i'_t = exp(i~_t - m_t),  f'_t = exp(log sigma(f~_t) + m_{t-1} - m_t)
    c_t  = f'_t c_{t-1} + i'_t tanh(z~_t)
    n_t  = f'_t n_{t-1} + i'_t
    h_t  = sigmoid(o~_t) c_t / n_t

``(h, c, n, m)`` is the state; the fresh state is all zeros, and ``n = 0`` marks it (after
the first step ``n >= 1``), which is how the official vanilla backend picks ``m_1 = i~_1``.
A reset before step ``t`` replaces the incoming state by the fresh one.

Backends (``backend=``; the table is :data:`BACKENDS`): ``reference`` (a ``lax.scan``
written as the equations above, float32, :mod:`.reference`), ``xla`` (one fused
``lax.scan`` over a packed ``(4, ...)`` carry with the input and bias added before the
loop and resets folded into a multiplicative mask, :mod:`.xla`), ``pallas_tpu`` (Mosaic
TPU: one fused kernel for the whole sequence with the recurrent matrices in VMEM,
:mod:`.tpu`; opt-in until run on a TPU) and ``pallas_gpu`` (Triton: one launch for the
whole sequence with each head's matrices split over several programs that exchange the
state every step, :mod:`.gpu`, tuned by an :class:`SLSTMConfig`; 5.1x the ``xla``
backend's forward+backward speed on an H100 at d 1024; opt-in by name). Both Pallas
backends have forward and backward kernels (custom VJP here); float64 takes the ``xla``
path. Under a mesh of several devices they run per (batch, head) shard under
``jax.shard_map`` over the axes ``sharding=`` names (:mod:`mnemax.kernels.sharding`).

A one-step call (``time == 1``, generation) takes the closed-form step
(:func:`.reference.one_step`) whatever the backend: no kernel launch.

Shapes::

    h, state = slstm(x, R, b, state=None, resets=None)
    x: (batch, time, 4, heads, head_dim)   input pre-activations of gates (i, f, z, o)
    R: (heads, head_dim, 4, head_dim)      R[h, d_in, gate, d_out]
    b: (4, heads, head_dim) or None
    resets: (batch, time) bool
    h: (batch, time, heads, head_dim) in x's dtype
    state: SLSTMState(h, c, n, m), each (batch, heads, head_dim), float32 (float64 for float64 x)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import dispatch
from ..sharding import KernelSharding, per_shard, plan
from . import gpu, reference, tpu, xla
from .common import OP, SLSTMConfig, SLSTMState, initial_state, validate

__all__ = ["BACKENDS", "SLSTMConfig", "SLSTMState", "initial_state", "slstm"]

DEFAULT_CONFIG = SLSTMConfig()


def slstm(x, R, b=None, *, state: SLSTMState | tuple | None = None, resets=None, backend: str | None = None,
          interpret: bool | None = None, config: SLSTMConfig | None = None, sharding: KernelSharding | None = None):
    """The sLSTM over a sequence; returns ``(h, SLSTMState)`` (see the module docstring).

    Args:
      x: (batch, time, 4, heads, head_dim) gate pre-activations from the input.
      R: (heads, head_dim, 4, head_dim) recurrent weights; b: (4, heads, head_dim) or None.
      state: incoming ``(h, c, n, m)``; None is the fresh (zero) state.
      resets: (batch, time) bool; True replaces the state by a fresh one before step t.
      backend: ``"reference"``, ``"xla"``, ``"pallas_gpu"`` or ``"pallas_tpu"``; None picks
        by platform (``MNEMAX_KERNEL_BACKEND`` overrides).
      interpret: run a Pallas backend in interpret mode (CPU); None reads
        ``MNEMAX_PALLAS_INTERPRET``.
      config: the Pallas GPU kernels' tuning (:class:`SLSTMConfig`); None: its defaults.
      sharding: the mesh axes splitting the batch and the heads, for the Pallas backends
        under a mesh of several devices (:class:`~mnemax.kernels.sharding.KernelSharding`;
        required there).
    """
    x, R, b, resets = validate(x, R, b, state, resets)
    if config is not None and not isinstance(config, SLSTMConfig):
        raise TypeError(f"config must be an SLSTMConfig or None, got {type(config).__name__}")
    if sharding is not None and not isinstance(sharding, KernelSharding):
        raise TypeError(f"sharding must be a KernelSharding or None, got {type(sharding).__name__}")
    batch, time, _, heads, head_dim = x.shape
    cdt = jnp.promote_types(jnp.result_type(x, R), jnp.float32)
    state = initial_state(batch, heads, head_dim, cdt) if state is None else SLSTMState(*(jnp.asarray(s, cdt) for s in state))
    b = jnp.zeros((4, heads, head_dim), cdt) if b is None else b.astype(cdt)
    name, impl = BACKENDS.resolve(backend)
    if time == 1:  # generation: the closed-form step, whatever the backend
        impl = _ONE_STEP
    kw = {}
    if time > 1 and name.startswith("pallas"):
        kw = {"interpret": dispatch.interpret_flag(interpret), "config": config or DEFAULT_CONFIG,
              "sharding": sharding}
    h, new_state = impl(x.astype(cdt), R.astype(cdt), b, state, resets, **kw)
    return h.astype(x.dtype), new_state


# ----------------------------------------------------------------------------- pallas


def _forward(platform, x, R, b, state, keep, save, config, interpret):
    if platform == "gpu":
        return gpu.forward(x, R, b, state, keep, config=config, save=save, interpret=interpret)
    return tpu.forward(x, R, b, state, keep, save=save, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _pallas_vjp(x, R, b, state, keep, platform, config, interpret):
    h, final, _ = _forward(platform, x, R, b, state, keep, False, config, interpret)
    return h, SLSTMState(*final)


def _pallas_fwd(x, R, b, state, keep, platform, config, interpret):
    h, final, saved = _forward(platform, x, R, b, state, keep, True, config, interpret)
    return (h, SLSTMState(*final)), (saved, keep)


def _pallas_bwd(platform, config, interpret, res, cts):
    saved, keep = res
    dh, dfinal = cts
    B, T, H, D = dh.shape
    if platform == "gpu":
        dx, dR, db, d0 = gpu.backward((B, T, 4, H, D), saved, dh, tuple(dfinal), config=config, interpret=interpret)
    else:
        dx, dR, db, d0 = tpu.backward((B, T, 4, H, D), saved, dh, tuple(dfinal), interpret=interpret)
    xdt = dh.dtype  # the compute dtype (float32): x was cast to it before the kernel
    return (dx.astype(xdt), dR.astype(xdt), db.astype(xdt), SLSTMState(*(a.astype(xdt) for a in d0)),
            None if keep is None else jnp.zeros_like(keep))


_pallas_vjp.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas(platform, x, R, b, state, resets, *, interpret, config, sharding):
    if x.dtype == jnp.float64:  # the kernels compute in float32
        return xla.fused(x, R, b, state, resets)

    def run(x, R, b, state, resets):
        keep = None if resets is None else 1.0 - resets.astype(jnp.float32)
        return _pallas_vjp(x, R, b, SLSTMState(*state), keep, platform, config, bool(interpret))

    split = plan(f"slstm (pallas_{platform})", sharding, x.shape[0], x.shape[3])
    if not split.split:
        return run(x, R, b, state, resets)
    # per (batch, head) shard: a pallas_call is opaque to the SPMD partitioner
    rows, cols = split.rows, split.cols
    P = jax.sharding.PartitionSpec
    st = SLSTMState(*(P(rows, cols),) * 4)
    specs = (P(rows, None, None, cols), P(cols), P(None, cols), st, P(rows))
    return per_shard(run, (x, R, b, SLSTMState(*state), resets), specs, (P(rows, None, cols), st))


_PALLAS_STATIC = ("interpret", "config", "sharding")
# Each implementation under jax.jit: one compiled unit when called eagerly, inlined under an outer jit.
_ONE_STEP = jax.jit(reference.one_step)

# The backends of ``slstm``: ``BACKENDS.available()``, ``BACKENDS.default(platform)``. The Pallas
# ones run only when named (opt-in until checked on a GPU / a TPU at every size the models use).
BACKENDS = dispatch.backends(OP, {
    "reference": jax.jit(reference.scan),
    "xla": jax.jit(xla.fused),
    "pallas_gpu": jax.jit(functools.partial(_pallas, "gpu"), static_argnames=_PALLAS_STATIC),
    "pallas_tpu": jax.jit(functools.partial(_pallas, "tpu"), static_argnames=_PALLAS_STATIC),
}, opt_in=frozenset({"pallas_gpu", "pallas_tpu"}))
