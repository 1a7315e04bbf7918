"""``mlstm``: the mLSTM memory of xLSTM (Beck et al., 2024, "xLSTM: Extended Long
Short-Term Memory", Section 2.3), in its recurrent, parallel and chunkwise forms.

Per batch row and head, with gate pre-activations ``i~_t``, ``f~_t`` (scalars),
key/query ``k_t, q_t`` (``d_qk``) and value ``v_t`` (``d_v``)::

    m_t = max(log sigma(f~_t) + m_{t-1}, i~_t)               stabiliser
    i'_t = exp(i~_t - m_t),  f'_t = exp(log sigma(f~_t) + m_{t-1} - m_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T                       (d_qk, d_v)
    n_t = f'_t n_{t-1} + i'_t k_t                             (d_qk)
    h_t = (s q_t)^T C_t / (max(|(s q_t)^T n_t|, exp(-m_t)) + eps),   s = qk_scale

``(C, n, m)`` is the stabilised state: the true memory is ``exp(m) C``. A fresh state
is all zeros (``m_0 = 0``, as in the official recurrent kernels), and ``h`` depends on
``m`` only through ``eps``. The scale ``s`` (default ``d_qk ** -0.5``) multiplies the
query, so ``C`` holds unscaled keys -- the convention of ``mlstm_kernels`` and xLSTM 7B
(the NeurIPS code scales the key instead, which changes the stored state by
``sqrt(d_qk)`` but not ``h``).

Resets: ``resets[:, t]`` True replaces the incoming state by a fresh one before step
``t``, so the state after a reset is exactly that of a sequence started there. In the
parallel and chunkwise forms this cuts the cumulative log-forget sum at the boundary;
the fresh state's ``m = 0`` enters the stabiliser as the candidate
``log sigma(f~_r) + sum of later log-forgets`` (the reset step's forget gate acting on
``m = 0``).

Forms (``backend=``; the table is :data:`BACKENDS`):

* ``reference`` -- ``lax.scan`` over time, the equations above (float32):
  ground truth (:mod:`.reference`).
* ``parallel``  -- quadratic: ``D_ts = exp(F_t - F_s + i~_s - m_t)`` with ``F`` the
  cumulative log-forget sum, ``h = ((s Q K^T) * D) V / normaliser``; for short
  sequences and tests (not in the table, never a default; :mod:`.reference`).
* ``xla``       -- chunkwise (:mod:`.xla`): the sequence is cut into chunks of
  ``chunk_size``, an associative scan carries ``(C, n, m)`` across chunks and each chunk's
  outputs are intra-chunk matmuls plus the carried state's contribution. Memory is
  O(time * chunk_size) per head.
* ``pallas_tpu`` / ``pallas_gpu`` -- the chunkwise form as Pallas kernels (Mosaic TPU,
  :mod:`.tpu`; Triton on GPU, :mod:`.gpu`, tuned by an :class:`MLSTMConfig`), forward and
  backward (custom VJP here); float64 inputs take the ``xla`` path. Opt-in (``backend=``
  or ``MNEMAX_KERNEL_BACKEND``): not the platform default until run at every head size the
  models use. Under a mesh of several devices they run per (batch, head) shard under
  ``jax.shard_map`` over the axes ``sharding=`` names (:mod:`mnemax.kernels.sharding`).

A one-step call (``time == 1``, generation) takes the closed-form recurrent update
(:func:`.reference.one_step`) whatever the backend: no padding to a chunk, no kernel.

Shapes::

    h, state = mlstm(q, k, v, i, f, state=None, resets=None, chunk_size=64)
    q, k: (batch, heads, time, d_qk);  v: (batch, heads, time, d_v)
    i, f: (batch, heads, time) gate pre-activations;  resets: (batch, time) bool
    h: (batch, heads, time, d_v) in the dtype of q, k, v
    state: MLSTMState(C (batch, heads, d_qk, d_v), n (batch, heads, d_qk), m (batch, heads)),
           float32 (float64 for float64 inputs)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import dispatch
from ..sharding import KernelSharding, per_shard, plan
from . import gpu, reference, tpu, xla
from .common import OP, MLSTMConfig, MLSTMState, initial_state, make_problem, pad_axis, state_in, state_out, validate

__all__ = ["BACKENDS", "MLSTMConfig", "MLSTMState", "initial_state", "mlstm"]

DEFAULT_CONFIG = MLSTMConfig()


def mlstm(
    q,
    k,
    v,
    i,
    f,
    *,
    state: MLSTMState | tuple | None = None,
    resets=None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    qk_scale: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    config: MLSTMConfig | None = None,
    sharding: KernelSharding | None = None,
):
    """The mLSTM over a sequence; returns ``(h, MLSTMState)`` (see the module docstring).

    Args:
      q, k: (batch, heads, time, d_qk); v: (batch, heads, time, d_v).
      i, f: input and forget gate pre-activations, (batch, heads, time).
      state: incoming ``(C, n, m)``; None is the fresh (zero) state.
      resets: (batch, time) bool; True replaces the state by a fresh one before step t.
      chunk_size: chunk length of the chunkwise forms (``xla``, Pallas); others ignore it.
      eps: added to the normaliser.
      qk_scale: multiplies the query; default ``d_qk ** -0.5``.
      backend: ``"reference"``, ``"parallel"``, ``"xla"``, ``"pallas_gpu"`` or
        ``"pallas_tpu"``; None picks by platform (``MNEMAX_KERNEL_BACKEND`` overrides).
      interpret: run a Pallas backend in interpret mode (CPU); None reads
        ``MNEMAX_PALLAS_INTERPRET``.
      config: the Pallas GPU kernels' tuning (:class:`MLSTMConfig`); None: its defaults.
      sharding: the mesh axes splitting the batch and the heads, for the Pallas backends
        under a mesh of several devices (:class:`~mnemax.kernels.sharding.KernelSharding`;
        required there).
    """
    q, k, v, i, f, resets = validate(q, k, v, i, f, state, resets, chunk_size)
    if config is not None and not isinstance(config, MLSTMConfig):
        raise TypeError(f"config must be an MLSTMConfig or None, got {type(config).__name__}")
    if sharding is not None and not isinstance(sharding, KernelSharding):
        raise TypeError(f"sharding must be a KernelSharding or None, got {type(sharding).__name__}")
    out_dtype = jnp.result_type(q, k, v)
    cdt = jnp.promote_types(jnp.result_type(q, k, v, i, f), jnp.float32)
    batch, heads, time, d_qk = q.shape
    if state is None:
        state = initial_state(batch, heads, d_qk, v.shape[-1], cdt)
    else:
        state = MLSTMState(*(jnp.asarray(s, cdt) for s in state))
    scale = d_qk**-0.5 if qk_scale is None else float(qk_scale)
    name, impl = ("parallel", _PARALLEL) if backend == "parallel" else BACKENDS.resolve(backend)
    i, f = i.astype(cdt), f.astype(cdt)
    if time == 1:  # generation: the closed-form step, whatever the backend
        h, new_state = _ONE_STEP(q, k, v, i, f, state, resets, eps=eps, scale=scale)
        return h.astype(out_dtype), new_state
    kw = {}
    if name.startswith("pallas"):
        kw = {"interpret": dispatch.interpret_flag(interpret), "config": config or DEFAULT_CONFIG,
              "sharding": sharding}
    h, new_state = impl(q, k, v, i, f, state, resets, chunk_size=chunk_size, eps=eps, scale=scale, **kw)
    return h.astype(out_dtype), new_state


# ----------------------------------------------------------------------------- pallas


def _forward(platform, q, k, v, i, f, state, keep, *, chunk_size, eps, scale, save, config, interpret):
    """h (B, H, T, d_v), the final (C, n, m) and, with ``save``, the kernels' saved values."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    p = make_problem(platform, q, k, v, i, f, keep, chunk_size)
    if platform == "tpu":
        outs = tpu.forward(p, state_in(p, state), q.dtype, scale=scale, eps=eps, save=save, interpret=interpret)
    else:
        outs = gpu.forward(p, state_in(p, state), q.dtype, scale=scale, eps=eps, save=save, config=config,
                           interpret=interpret)
    h = outs[0][:, :T, :dv].reshape(B, H, T, dv)
    return h, state_out(*outs[1:4], (B, H, dk, dv)), (tuple(outs[4:]) if save else None)


def _backward(platform, q, k, v, i, f, state, keep, final, bounds, dh, dfinal, *, chunk_size, eps, scale, config,
              interpret):
    """Gradients (dq, dk, dv, di, df, (dC0, dn0, dm0)) given the outputs' cotangents."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    p = make_problem(platform, q, k, v, i, f, keep, chunk_size)
    Tp = p.n_chunks * p.L
    dh = pad_axis(pad_axis(dh.reshape(B * H, T, dv), 1, Tp), 2, p.d_v).astype(q.dtype)
    gC, gn, gmT = (a.astype(jnp.float32) for a in dfinal)
    C_T, n_T, _ = final
    # d/dm_T at fixed exp(m_T) C_T: the returned (C, n) scale with exp(-m_T).
    gm = gmT - jnp.sum(gC * C_T, axis=(2, 3)) - jnp.sum(gn * n_T, axis=2)
    dstate = state_in(p, (gC, gn, gm))
    if platform == "tpu":
        dq, dk_, dv_, dg, dC, dn, dm = tpu.backward(p, dh, bounds, dstate, scale=scale, eps=eps, interpret=interpret)
    else:
        dq, dk_, dv_, dg, dC, dn, dm = gpu.backward(p, dh, bounds, dstate, scale=scale, eps=eps, config=config,
                                                    interpret=interpret)
    seq = lambda a, d: a[:, :T, :d].reshape(B, H, T, d)  # noqa: E731
    rows = dg.shape[2]
    dg = jnp.swapaxes(dg, 1, 2).reshape(B * H, rows, Tp)[:, :, :T].reshape(B, H, rows, T)
    di, dlogf = dg[:, :, 0], dg[:, :, 1]
    dC0, dn0, gm0 = state_out(dC, dn, dm, (B, H, dk, dv))
    C0, n0, _ = state
    dm0 = gm0 + jnp.sum(dC0 * C0, axis=(2, 3)) + jnp.sum(dn0 * n0, axis=2)
    return seq(dq, dk), seq(dk_, dk), seq(dv_, dv), di, dlogf * jax.nn.sigmoid(-f), (dC0, dn0, dm0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12, 13, 14))
def _pallas_vjp(q, k, v, i, f, C0, n0, m0, keep, platform, chunk_size, eps, scale, config, interpret):
    h, final, _ = _forward(platform, q, k, v, i, f, (C0, n0, m0), keep, chunk_size=chunk_size, eps=eps, scale=scale,
                           save=False, config=config, interpret=interpret)
    return h, final


def _pallas_fwd(q, k, v, i, f, C0, n0, m0, keep, platform, chunk_size, eps, scale, config, interpret):
    h, final, bounds = _forward(platform, q, k, v, i, f, (C0, n0, m0), keep, chunk_size=chunk_size, eps=eps,
                                scale=scale, save=True, config=config, interpret=interpret)
    return (h, final), (q, k, v, i, f, C0, n0, m0, keep, final, bounds)


def _pallas_bwd(platform, chunk_size, eps, scale, config, interpret, res, cts):
    q, k, v, i, f, C0, n0, m0, keep, final, bounds = res
    dh, dfinal = cts
    dq, dk, dv, di, df, (dC0, dn0, dm0) = _backward(
        platform, q, k, v, i, f, (C0, n0, m0), keep, final, bounds, dh, dfinal, chunk_size=chunk_size, eps=eps,
        scale=scale, config=config, interpret=interpret)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), di.astype(i.dtype), df.astype(f.dtype),
            dC0.astype(C0.dtype), dn0.astype(n0.dtype), dm0.astype(m0.dtype), None if keep is None else jnp.zeros_like(keep))


_pallas_vjp.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas(platform, q, k, v, i, f, state, resets, *, chunk_size, eps, scale, interpret, config, sharding):
    if i.dtype == jnp.float64:  # the kernels compute in float32
        return xla.chunkwise(q, k, v, i, f, state, resets, chunk_size=chunk_size, eps=eps, scale=scale)

    def run(q, k, v, i, f, state, resets):
        keep = None if resets is None else 1.0 - resets.astype(jnp.float32)
        h, final = _pallas_vjp(q, k, v, i, f, *state, keep, platform, chunk_size, eps, scale, config, bool(interpret))
        return h, MLSTMState(*final)

    split = plan(f"mlstm (pallas_{platform})", sharding, q.shape[0], q.shape[1])
    if not split.split:
        return run(q, k, v, i, f, state, resets)
    # per (batch, head) shard: a pallas_call is opaque to the SPMD partitioner
    bh = jax.sharding.PartitionSpec(split.rows, split.cols)
    st = MLSTMState(bh, bh, bh)
    specs = (bh,) * 5 + (st, jax.sharding.PartitionSpec(split.rows))
    return per_shard(run, (q, k, v, i, f, MLSTMState(*state), resets), specs, (bh, st))


_STATIC = ("chunk_size", "eps", "scale")
_PALLAS_STATIC = _STATIC + ("interpret", "config", "sharding")
# Each implementation under jax.jit: one compiled unit when called eagerly, inlined under an outer jit.
_PARALLEL = jax.jit(reference.parallel, static_argnames=_STATIC)
_ONE_STEP = jax.jit(reference.one_step, static_argnames=("eps", "scale"))

# The backends of ``mlstm``: ``BACKENDS.available()``, ``BACKENDS.default(platform)``.
# pallas_gpu: checked on H100/H200 at heads up to d_qk 256 / d_v 512 (benchmarks/RESULTS.md), not
# yet at xlstm-1.3b's 1024-wide heads, which backend=None would send there on a GPU; pallas_tpu:
# until checked on a TPU.
BACKENDS = dispatch.backends(OP, {
    "reference": jax.jit(reference.recurrent, static_argnames=_STATIC),
    "xla": jax.jit(xla.chunkwise, static_argnames=_STATIC),
    "pallas_gpu": jax.jit(functools.partial(_pallas, "gpu"), static_argnames=_PALLAS_STATIC),
    "pallas_tpu": jax.jit(functools.partial(_pallas, "tpu"), static_argnames=_PALLAS_STATIC),
}, opt_in=frozenset({"pallas_gpu", "pallas_tpu"}))
