"""``selective_scan``: the selective state-space recurrence of Mamba (S6).

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023),
Algorithm 2. Per batch row, channel ``d`` and state index ``n``::

    dt_t     = softplus(dt_t + dt_bias)            (each step only if asked for)
    Abar_t   = exp(dt_t[d] * A[d, n])              zero-order hold for A
    h_t      = Abar_t * h_{t-1} + dt_t[d] * B_t[n] * x_t[d]
    y_t[d]   = sum_n C_t[n] h_t[d, n] + D[d] * x_t[d]
    y_t[d]  *= silu(z_t[d])                         (if z is given)

Shapes: ``x``, ``dt``, ``z``: (batch, time, channels); ``A``: (channels, state);
``B``, ``C``: (batch, time, state); ``D``, ``dt_bias``: (channels,); ``h0`` and the
final state: (batch, channels, state); ``resets``: (batch, time) bool clears the state
before step t (``h0`` is ignored in rows with ``resets[:, 0]``).

Arithmetic runs in float32 (float64 for float64 inputs), also for bf16 inputs; ``y``
has the promoted dtype of ``x`` (and ``z``); the final state is float32 (float64).

Backends (:data:`BACKENDS`, chosen as :mod:`mnemax.kernels.dispatch` says); each is
called as ``impl(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets,
return_state, chunk_size)`` on validated, uncast inputs and returns ``(y, h_last or
None)``:

* ``reference`` (:mod:`.reference`): a ``lax.scan`` over time, differentiated by JAX.
* ``xla`` (:mod:`.xla`): chunks of ``chunk_size`` steps, an associative scan inside each.
* ``pallas_gpu`` (:mod:`.gpu`) / ``pallas_tpu`` (:mod:`.tpu`): fused Pallas kernels,
  forward and backward, wired here as a ``jax.custom_vjp`` (backward = reverse scan
  recomputing each chunk from the forward's saved chunk-boundary states), tuned by a
  :class:`SelectiveScanConfig` (a static argument), run per shard under
  ``jax.shard_map`` over the mesh axes a :class:`~mnemax.kernels.sharding.KernelSharding`
  names. On the GPU a batch too small to fill the SMs is cut into time segments
  scanned in parallel (``SelectiveScanConfig.time_split``).

A call with one time step (generation) takes :func:`.common.one_step`, the closed form
above in a few ``jnp`` ops, on every backend: no padding to a chunk, no kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import dispatch
from ..sharding import KernelSharding, per_shard, plan
from . import gpu, reference, tpu, xla
from .common import (
    OP,
    SelectiveScanConfig,
    compute_dtype,
    config_or_default,
    effective_dt,
    one_step,
    time_segments,
    validate,
)

__all__ = ("BACKENDS", "OP", "SelectiveScanConfig", "selective_scan")


def _platform(platform: str):
    return gpu if platform == "gpu" else tpu


def _dtypes(x, dt, z):
    return {"x": jnp.result_type(x), "dt": jnp.result_type(dt), "z": None if z is None else jnp.result_type(z)}


# ----------------------------------------------------------------------------- the kernels' custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13, 14))
def _pallas_scan(x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, softplus, chunk, interpret, config):
    kernels = _platform(platform)
    resets = None if keep is None else keep < 0.5
    # no backward follows this call (jax.custom_vjp runs _pallas_fwd under differentiation):
    # the GPU forward takes its own, longer chunk
    p = kernels.make_problem(config, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk, training=False)
    out_dtype = jnp.result_type(x) if z is None else jnp.result_type(x, z)
    y, h_last, _ = kernels.forward(config, p, out_dtype, interpret=interpret)
    return y, h_last


def _pallas_fwd(x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, softplus, chunk, interpret, config):
    kernels = _platform(platform)
    resets = None if keep is None else keep < 0.5
    p = kernels.make_problem(config, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk)
    out_dtype = jnp.result_type(x) if z is None else jnp.result_type(x, z)
    y, h_last, bounds = kernels.forward(config, p, out_dtype, save_bounds=True, interpret=interpret)
    return (y, h_last), (x, dt, A, B, C, D, z, dt_bias, h0, keep, bounds)


def _pallas_bwd(platform, softplus, chunk, interpret, config, res, cts):
    kernels = _platform(platform)
    x, dt, A, B, C, D, z, dt_bias, h0, keep, bounds = res
    gy, gh_last = cts
    resets = None if keep is None else keep < 0.5
    p = kernels.make_problem(config, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk)
    g = kernels.backward(config, p, gy, gh_last, bounds, _dtypes(x, dt, z), interpret=interpret)

    def cast(v, like):
        return None if like is None else v.astype(jnp.result_type(like))

    return (
        cast(g["x"], x), cast(g["dt"], dt), cast(g["A"], A), cast(g["B"], B), cast(g["C"], C), cast(g["D"], D),
        cast(g["z"], z), cast(g["dt_bias"], dt_bias), cast(g["h0"], h0), None if keep is None else jnp.zeros_like(keep),
    )


_pallas_scan.defvjp(_pallas_fwd, _pallas_bwd)


def _split_scan(x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, softplus, chunk, interpret, config, segments):
    """The scan over ``segments`` pieces of the sequence in parallel, for a batch too small
    to fill the GPU (each (batch row, 128 channels) is one program of the kernel).

    1. Every full segment of L steps runs from a zero state (one kernel call over batch x
       (segments - 1) rows): its end state ``e_s``.
    2. Its transition is diagonal: ``P_s = exp(A * sum(dt)) * prod(keep)`` (0 after a reset).
       The segments' start states follow in a short scan: ``h_{s+1} = P_s h_s + e_s``, ``h_0 = h0``.
    3. Every segment runs again from its start state, the last (shorter) one on its own;
       its outputs are the scan's.

    About twice the arithmetic of one pass, spread over ``segments`` times the programs; the
    gradient is JAX's through the two kernel calls (their custom VJPs) and step 2."""
    static = (platform, softplus, chunk, interpret, config)
    bt, time, ch = x.shape
    seg_len = -(-time // segments)
    seg_len += (-seg_len) % 8
    full = -(-time // seg_len) - 1  # full segments before the last
    if full < 1:
        return _pallas_scan(x, dt, A, B, C, D, z, dt_bias, h0, keep, *static)
    head = full * seg_len

    def cut(v):  # (bt, time, ...) -> (bt * full, seg_len, ...): the full segments as rows
        return None if v is None else v[:, :head].reshape((bt * full, seg_len) + v.shape[2:])

    xs, dts, bs, cs, zs, ks = (cut(v) for v in (x, dt, B, C, z, keep))
    _, ends = _pallas_scan(xs, dts, A, bs, cs, D, zs, dt_bias, None, ks, *static)
    n = A.shape[1]
    f32 = jnp.float32
    delta = effective_dt(dt[:, :head], dt_bias, softplus, f32).reshape(bt, full, seg_len, ch).sum(axis=2)
    trans = jnp.exp(delta[..., None] * A.astype(f32))  # (bt, full, ch, n)
    if keep is not None:
        trans = trans * jnp.prod(keep[:, :head].reshape(bt, full, seg_len), axis=2)[..., None, None]
    ends = ends.reshape(bt, full, ch, n)
    start0 = jnp.zeros((bt, ch, n), f32) if h0 is None else h0.astype(f32)

    def step(h, te):
        t, e = te
        return t * h + e, h  # emits this segment's start state

    last_start, starts = lax.scan(step, start0, (jnp.moveaxis(trans, 1, 0), jnp.moveaxis(ends, 1, 0)))
    starts = jnp.moveaxis(starts, 0, 1).reshape(bt * full, ch, n)
    y_head, _ = _pallas_scan(xs, dts, A, bs, cs, D, zs, dt_bias, starts, ks, *static)

    def tail(v):
        return None if v is None else v[:, head:]

    y_tail, h_last = _pallas_scan(tail(x), tail(dt), A, tail(B), tail(C), D, tail(z), dt_bias, last_start, tail(keep),
                                  *static)
    return jnp.concatenate([y_head.reshape(bt, head, ch), y_tail], axis=1), h_last


def _pallas(platform, x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets, return_state, chunk_size, config,
            interpret=False):
    keep = None if resets is None else 1.0 - resets.astype(jnp.float32)
    args = (x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, bool(dt_softplus), chunk_size, bool(interpret), config)
    segments = time_segments(config, platform, x.shape[0], x.shape[1], x.shape[2], bool(interpret))
    y, h = _split_scan(*args, segments) if segments > 1 else _pallas_scan(*args)
    return y, (h if return_state else None)


BACKENDS = dispatch.backends(OP, {
    "reference": reference.scan,
    "xla": xla.scan,
    "pallas_gpu": functools.partial(_pallas, "gpu"),
    "pallas_tpu": functools.partial(_pallas, "tpu"),
})


# ----------------------------------------------------------------------------- the op


def selective_scan(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    h0=None,
    resets=None,
    return_state: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    config: SelectiveScanConfig | None = None,
    sharding: KernelSharding | None = None,
):
    """Mamba's selective scan (see the module docstring for the equations).

    Args:
      x: input ``u``, (batch, time, channels).
      dt: step sizes before ``dt_bias``/softplus, (batch, time, channels).
      A: continuous-time diagonal state matrix, (channels, state) (negative for decay).
      B, C: input-dependent input and output matrices, (batch, time, state).
      D: skip connection, (channels,).
      z: gate, (batch, time, channels); the output is multiplied by ``silu(z)``.
      dt_bias: added to ``dt`` before the softplus, (channels,).
      dt_softplus: apply ``softplus`` to ``dt + dt_bias``.
      h0: initial state, (batch, channels, state); zeros when None.
      resets: (batch, time) bool; clears the state before step t.
      return_state: also return the final state (batch, channels, state).
      chunk_size: time steps per chunk of the ``xla`` backend; for the Pallas backends it
        overrides the config's chunks. None picks a default.
      backend: ``"reference"``, ``"xla"``, ``"pallas_gpu"`` or ``"pallas_tpu"``; None picks by
        platform (``MNEMAX_KERNEL_BACKEND`` overrides).
      interpret: run a Pallas backend in interpret mode (CPU); None reads
        ``MNEMAX_PALLAS_INTERPRET``.
      config: the Pallas kernels' :class:`SelectiveScanConfig` (None: the defaults).
      sharding: the mesh axes that split the batch and the channels
        (:class:`~mnemax.kernels.sharding.KernelSharding`); needed when a Pallas backend
        runs under a mesh of more than one device (:func:`~mnemax.kernels.sharding.plan`).

    Returns:
      ``y`` (batch, time, channels), or ``(y, h_last)`` with ``return_state=True``.
    """
    validate(x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk_size)
    config = config_or_default(config)
    if resets is not None:
        resets = jnp.asarray(resets).astype(bool)
    out_dtype = jnp.result_type(x) if z is None else jnp.result_type(x, z)
    name, impl = BACKENDS.resolve(backend)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, h0=h0, resets=resets)
    if x.shape[1] == 1:  # one step (generation): the closed form, whatever the backend
        y, h = one_step(x, dt, A, B, C, **kw)
        y = y.astype(out_dtype)
        return (y, h) if return_state else y
    if name.startswith("pallas") and jnp.dtype(compute_dtype(x, dt, A, B, C, D, z, dt_bias, h0)) == jnp.float64:
        name, impl = BACKENDS.resolve("xla")  # the kernels compute in float32; float64 takes the XLA path
    if name.startswith("pallas"):
        impl = functools.partial(impl, config=config, interpret=dispatch.interpret_flag(interpret))
        split = plan(OP, sharding, x.shape[0], x.shape[2])
    else:
        split = None

    def run(x, dt, A, B, C, D, z, dt_bias, h0, resets):
        y, h = impl(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, h0=h0, resets=resets,
                    return_state=return_state, chunk_size=chunk_size)
        return (y, h) if return_state else y

    args = (x, dt, A, B, C, D, z, dt_bias, h0, resets)
    if split is None or not split.split:
        out = run(*args)
    else:  # the kernel per (batch, channel) shard: see mnemax.kernels.sharding
        P = jax.sharding.PartitionSpec
        rows, cols = split.rows, split.cols
        seq, ch, rows_only = P(rows, None, cols), P(cols), P(rows)
        specs = (seq, seq, P(cols, None), rows_only, rows_only, ch, seq, ch, P(rows, cols, None), rows_only)
        out = per_shard(run, args, specs, (seq, P(rows, cols, None)) if return_state else seq)
    y, h = out if return_state else (out, None)
    y = y.astype(out_dtype)
    return (y, h) if return_state else y
