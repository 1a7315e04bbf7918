"""``gated_linear_attention``: linear attention with a decaying matrix state, the op of
GLA (Yang et al., 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training"), RetNet (Sun et al., 2023), Lightning attention (Qin et al., 2024) and
Mamba-2's SSD (Dao & Gu, 2024, "Transformers are SSMs").

Per batch row and head, with log decays ``g_t <= 0``::

    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T        S: (d_k, d_v)
    o_t = S_t^T (scale q_t)

``g`` is one log decay per head and step (RetNet's fixed ``log gamma_h``, Lightning's,
Mamba-2's ``dt_t A_h``), one per key channel (GLA's ``log sigmoid(...)`` gate), or None
(plain linear attention, no decay). Mamba-2 maps to ``q = C``, ``k = dt B``, ``v = x``,
``scale = 1``.

Resets: ``resets[:, t]`` True clears the incoming state before step ``t``, so the state
after a reset is exactly that of a sequence started there.

Forms (``backend=``; the table is :data:`BACKENDS`):

* ``reference`` -- ``lax.scan`` over time, the equations above (:mod:`.reference`).
* ``xla``       -- chunkwise (:mod:`.xla`): intra-chunk decay-masked matmuls in log
  space, states carried across chunks; memory O(time * chunk_size) per head. The
  platform default everywhere.
* ``pallas_gpu`` -- the chunkwise form as Pallas GPU (Triton) kernels, forward and backward
  (a custom VJP recomputing from the saved chunk-boundary states), tuned by a
  :class:`~mnemax.kernels.chunked_gpu.ChunkedConfig`: :mod:`mnemax.kernels.chunked_gpu` for
  ``g`` None or one log decay per head, :mod:`.gpu` for one per key channel (intra-chunk
  scores in sub-chunks); float64 inputs take the ``xla`` path.
  Opt-in (``backend=`` or ``MNEMAX_KERNEL_BACKEND``). Under a mesh of several devices it runs
  per (batch, head) shard under ``jax.shard_map`` over the axes ``sharding=`` names.
* ``pallas_tpu`` -- the same chunkwise form and custom VJP as Pallas TPU (Mosaic) kernels,
  one kernel walking the chunks forward writing the outputs and one walking them back
  writing every gradient: :mod:`mnemax.kernels.chunked_tpu` for ``g`` None or one log decay
  per head, :mod:`.tpu` for one per key channel (intra-chunk scores in sub-chunks); float64
  inputs take the ``xla`` path; ``config=`` is ignored. Opt-in, and sharded per (batch, head)
  as ``pallas_gpu``; checked in interpret mode and by its TPU lowering, not yet on a TPU.

Grouped query/key heads: ``q`` and ``k`` may have fewer heads than ``v``, a divisor of
them; q/k head ``j`` then serves the ``rep = heads / heads_qk`` consecutive value heads ``j *
rep ... (j + 1) * rep - 1`` (Mamba-2's ``n_groups`` of B and C, grouped-query attention's
layout). The ``pallas_gpu`` kernels for ``g`` None or one decay per head read each group in
place; the other forms repeat q and k over the heads first.

A one-step call (``time == 1``, generation) takes the closed-form recurrent update
(:func:`.reference.one_step`) whatever the backend.

Shapes::

    o, state = gated_linear_attention(q, k, v, g, state=None, resets=None, scale=None, chunk_size=64)
    q, k: (batch, heads, time, d_k), or (batch, heads / rep, time, d_k) grouped;  v: (batch, heads, time, d_v)
    g: None, (batch, heads, time) or (batch, heads, time, d_k) log decays (<= 0)
    resets: (batch, time) bool
    o: (batch, heads, time, d_v) in the dtype of q, k, v
    state: (batch, heads, d_k, d_v), float32 (float64 for float64 inputs)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import chunked_gpu as cg
from .. import chunked_pallas as cp
from .. import chunked_tpu as ct
from .. import dispatch
from ..chunked import repeat_heads
from ..chunked_gpu import ChunkedConfig
from ..sharding import KernelSharding, per_shard, plan
from . import gpu, gpu_grouped, reference, tpu, xla
from .common import OP, validate, zeros_state

__all__ = ["BACKENDS", "ChunkedConfig", "gated_linear_attention", "zeros_state"]

DEFAULT_CONFIG = ChunkedConfig()


def gated_linear_attention(q, k, v, g=None, *, state=None, resets=None, scale: float | None = None,
                           chunk_size: int = 64, backend: str | None = None, interpret: bool | None = None,
                           config: ChunkedConfig | None = None, sharding: KernelSharding | None = None):
    """The decayed linear attention over a sequence; returns ``(o, state)`` (see the
    module docstring for the equations and shapes).

    Args:
      q, k: (batch, heads, time, d_k), or (batch, heads_qk, time, d_k) with heads_qk dividing
        ``heads`` (grouped heads, see the module docstring); v: (batch, heads, time, d_v).
      g: log decays (<= 0): None, (batch, heads, time) or (batch, heads, time, d_k).
      state: incoming (batch, heads, d_k, d_v); None is the zero state.
      resets: (batch, time) bool; True clears the state before step t.
      scale: multiplies q; default ``d_k ** -0.5`` (fla's default; Mamba-2 uses 1).
      chunk_size: chunk length of the chunkwise forms (``xla``, Pallas).
      backend: ``"reference"``, ``"xla"``, ``"pallas_gpu"`` or ``"pallas_tpu"``; None picks by
        platform (``MNEMAX_KERNEL_BACKEND`` overrides).
      interpret: run a Pallas backend in interpret mode (CPU); None reads ``MNEMAX_PALLAS_INTERPRET``.
      config: the Pallas GPU kernels' tuning (:class:`ChunkedConfig`); None: its defaults
        (``pallas_tpu`` ignores it).
      sharding: the mesh axes splitting the batch and the heads, for the Pallas backends under
        a mesh of several devices (:class:`~mnemax.kernels.sharding.KernelSharding`).
    """
    q, k, v, g, resets, scale = validate(q, k, v, g, state, resets, chunk_size, scale)
    if config is not None and not isinstance(config, ChunkedConfig):
        raise TypeError(f"config must be a ChunkedConfig or None, got {type(config).__name__}")
    if sharding is not None and not isinstance(sharding, KernelSharding):
        raise TypeError(f"sharding must be a KernelSharding or None, got {type(sharding).__name__}")
    out_dtype = jnp.result_type(q, k, v)
    cdt = jnp.promote_types(out_dtype if g is None else jnp.result_type(out_dtype, g), jnp.float32)
    batch, heads, time, d_k = v.shape[:3] + q.shape[3:]
    state = zeros_state(batch, heads, d_k, v.shape[-1], cdt) if state is None else jnp.asarray(state, cdt)
    name, impl = BACKENDS.resolve(backend)
    in_place = name == "pallas_gpu" and (g is None or g.ndim == 3)  # the kernels that read groups in place
    if time == 1 or not in_place:
        q, k = (repeat_heads(a, heads) for a in (q, k))
    if time == 1:  # generation: the closed-form step, whatever the backend
        o, state = _ONE_STEP(q, k, v, g, state, resets, scale=scale)
        return o.astype(out_dtype), state
    kw = {}
    if name.startswith("pallas"):
        kw = {"interpret": dispatch.interpret_flag(interpret), "config": config or DEFAULT_CONFIG,
              "sharding": sharding}
    o, state = impl(q, k, v, g, state, resets, chunk_size=chunk_size, scale=scale, **kw)
    return o.astype(out_dtype), state


# ----------------------------------------------------------------------------- pallas


def _forward(platform, q, k, v, g, state, cut, *, chunk_size, scale, config, interpret, save=True):
    per_channel = g is not None and g.ndim == 4
    if platform == "tpu" and per_channel:
        return tpu.forward(q, k, v, g, state, cut, chunk_size=chunk_size, scale=scale, save=save, interpret=interpret)
    if platform == "tpu":
        p = ct.make_problem(q, k, v, g, None, cut, chunk_size)
        o, S_T, states, _ = ct.forward(p, p.v, None, cp.state_in(p, state), q.dtype, scale=scale, delta=False,
                                       save=save, interpret=interpret)
        return cp.seq_out(o, v.shape), cp.state_out(S_T, state.shape), states
    if per_channel:
        return gpu.forward(q, k, v, g, state, cut, chunk_size=chunk_size, scale=scale, config=config,
                           interpret=interpret)
    p = cg.make_problem(q, k, v, g, None, cut, chunk_size)
    states, _, S_T = cg.walk_forward(p, p.v, None, cp.state_in(p, state), delta=False, config=config,
                                     interpret=interpret)
    hb = config.heads_per_program(p.rep)
    if hb > 1:
        o = gpu_grouped.outputs(p, states, q.dtype, hb=hb, scale=scale, config=config, interpret=interpret)
    else:
        o = cg.outputs(p, p.v, states, q.dtype, scale=scale, delta=False, config=config, interpret=interpret)
    return cp.seq_out(o, v.shape), cp.state_out(S_T, state.shape), states


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _pallas_vjp(q, k, v, g, state, cut, platform, chunk_size, scale, config, interpret):
    o, final, _ = _forward(platform, q, k, v, g, state, cut, chunk_size=chunk_size, scale=scale, config=config,
                           interpret=interpret, save=False)
    return o, final


def _pallas_fwd(q, k, v, g, state, cut, platform, chunk_size, scale, config, interpret):
    o, final, states = _forward(platform, q, k, v, g, state, cut, chunk_size=chunk_size, scale=scale, config=config,
                                interpret=interpret)
    return (o, final), (q, k, v, g, state, cut, states)


def _pallas_bwd(platform, chunk_size, scale, config, interpret, res, cts):
    q, k, v, g, state, cut, states = res
    do, dfinal = cts
    per_channel = g is not None and g.ndim == 4
    if platform == "tpu" and per_channel:
        grads = tpu.backward(q, k, v, g, state, cut, states, do, dfinal, chunk_size=chunk_size, scale=scale,
                             interpret=interpret)
        return grads + (None if cut is None else jnp.zeros_like(cut),)
    if platform == "tpu":
        p = ct.make_problem(q, k, v, g, None, cut, chunk_size)
        dq, dk, dv, rows, dS0 = ct.backward(p, p.v, ct.pad_cotangent(p, do), states, cp.state_in(p, dfinal),
                                            scale=scale, delta=False, interpret=interpret)
        return _grads(q, k, v, g, state, cut, dq, dk, dv, rows, dS0)
    if per_channel:
        grads = gpu.backward(q, k, v, g, state, cut, states, do, dfinal, chunk_size=chunk_size, scale=scale,
                             config=config, interpret=interpret)
        return grads + (None if cut is None else jnp.zeros_like(cut),)
    p = cg.make_problem(q, k, v, g, None, cut, chunk_size)
    B, H, T, _ = v.shape
    do = cp.pad_axis(cp.pad_axis(do.astype(q.dtype).reshape(B * H, T, -1), 1, p.n_chunks * p.L), 2, p.d_v)
    dstates, _, dS0 = cg.walk_backward(p, do, None, None, cp.state_in(p, dfinal), scale=scale, delta=False,
                                       config=config, interpret=interpret)
    hb = config.heads_per_program(p.rep)
    if hb > 1:
        dq, dk, dv, rows = gpu_grouped.chunk_grads(p, do, states, dstates, hb=hb, scale=scale, config=config,
                                                   interpret=interpret)
    else:
        dq, dk, dv, rows = cg.chunk_grads(p, p.v, do, states, dstates, scale=scale, delta=False, config=config,
                                          interpret=interpret)
    return _grads(q, k, v, g, state, cut, dq, dk, dv, rows, dS0)


def _grads(q, k, v, g, state, cut, dq, dk, dv, rows, dS0):
    """The custom VJP's cotangents from the kernels' layouts (dq and dk per value head, or per
    ``hb`` value heads (:func:`~.gpu_grouped.chunk_grads`), summed over
    the rest of each group of grouped q/k heads)."""
    dg = None if g is None else cp.step_out(cp.decay_grad(rows[:, :, 0]), g.shape).astype(g.dtype)
    B, T, d_k = v.shape[0], v.shape[2], q.shape[3]
    per_row = (B, dq.shape[0] // B, T, d_k)  # value heads / hb rows per batch row
    dq, dk = (cp.group_sum(cp.seq_out(d, per_row), per_row[1] // q.shape[1]) for d in (dq, dk))
    return (dq.astype(q.dtype), dk.astype(k.dtype),
            cp.seq_out(dv, v.shape).astype(v.dtype), dg, cp.state_out(dS0, state.shape).astype(state.dtype),
            None if cut is None else jnp.zeros_like(cut))


_pallas_vjp.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas(platform, q, k, v, g, state, resets, *, chunk_size, scale, interpret, config, sharding):
    if state.dtype == jnp.float64:  # the kernels compute in float32
        q, k = (repeat_heads(a, v.shape[1]) for a in (q, k))
        return xla.chunkwise(q, k, v, g, state, resets, chunk_size=chunk_size, scale=scale)
    dt = jnp.result_type(q, k, v)

    def run(q, k, v, g, state, resets):
        cut = None if resets is None else resets.astype(jnp.float32)
        return _pallas_vjp(q.astype(dt), k.astype(dt), v.astype(dt), g, state, cut, platform, chunk_size, scale,
                           config, bool(interpret))

    split = plan(f"{OP} (pallas_{platform})", sharding, v.shape[0], v.shape[1])
    if split.cols is not None and q.shape[1] % jax.sharding.get_abstract_mesh().shape[split.cols]:
        q, k = (repeat_heads(a, v.shape[1]) for a in (q, k))  # the groups do not split over the heads axis
    if not split.split:
        return run(q, k, v, g, state, resets)
    bh = jax.sharding.PartitionSpec(split.rows, split.cols)
    specs = (bh,) * 5 + (jax.sharding.PartitionSpec(split.rows),)
    return per_shard(run, (q, k, v, g, state, resets), specs, (bh, bh))


_STATIC = ("chunk_size", "scale")
_PALLAS_STATIC = _STATIC + ("interpret", "config", "sharding")
_ONE_STEP = jax.jit(reference.one_step, static_argnames=("scale",))

# The backends of ``gated_linear_attention``: ``BACKENDS.available()``, ``BACKENDS.default(platform)``.
BACKENDS = dispatch.backends(OP, {
    "reference": jax.jit(reference.recurrent, static_argnames=_STATIC),
    "xla": jax.jit(xla.chunkwise, static_argnames=_STATIC),
    "pallas_gpu": jax.jit(functools.partial(_pallas, "gpu"), static_argnames=_PALLAS_STATIC),
    "pallas_tpu": jax.jit(functools.partial(_pallas, "tpu"), static_argnames=_PALLAS_STATIC),
}, opt_in=frozenset({"pallas_gpu", "pallas_tpu"}))
