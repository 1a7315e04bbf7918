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

Backends (see :mod:`mnemax.kernels.dispatch`): every one is called as
``impl(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets, return_state,
chunk_size)`` on validated, uncast inputs and returns ``(y, h_last or None)``.

* ``reference``: a ``lax.scan`` over time, differentiated by JAX: the ground truth.
* ``pallas_gpu`` / ``pallas_tpu``: fused Pallas kernels, forward and backward
  (:mod:`mnemax.kernels.pallas_selective_scan`).
* ``xla``: a ``lax.scan`` over chunks of ``chunk_size`` steps carrying the
  (batch, channels, state) state; inside a chunk, a ``lax.associative_scan`` over the
  pairs (Abar_t, dt_t B_t x_t) under ``jax.checkpoint``. Only one chunk of
  (batch, chunk, channels, state) is alive at a time, forward and backward; the
  backward pass saves the chunk-boundary states and recomputes each chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import dispatch
from .checks import bool_resets, float_array

OP = "selective_scan"
DEFAULT_CHUNK = 64


def _shape(v):
    return getattr(v, "shape", None)


def _check(name, value, want, what):
    if _shape(value) != want:
        raise ValueError(f"{name} must have shape {what} = {want}, got shape {_shape(value)}")


def _validate(x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk_size):
    for name, value in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                        ("h0", h0)):
        if value is not None:
            float_array(name, value)
    if _shape(x) is None or len(x.shape) != 3:
        raise ValueError(f"x must have shape (batch, time, channels), got shape {_shape(x)}")
    batch, time, channels = x.shape
    if _shape(A) is None or len(A.shape) != 2 or A.shape[0] != channels:
        raise ValueError(f"A must have shape (channels, state) with channels = {channels}, got shape {_shape(A)}")
    state = A.shape[1]
    _check("dt", dt, (batch, time, channels), "(batch, time, channels)")
    _check("B", B, (batch, time, state), "(batch, time, state)")
    _check("C", C, (batch, time, state), "(batch, time, state)")
    if D is not None:
        _check("D", D, (channels,), "(channels,)")
    if dt_bias is not None:
        _check("dt_bias", dt_bias, (channels,), "(channels,)")
    if z is not None:
        _check("z", z, (batch, time, channels), "(batch, time, channels)")
    if h0 is not None:
        _check("h0", h0, (batch, channels, state), "(batch, channels, state)")
    bool_resets(resets, batch, time)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def compute_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when any input is float64."""
    dt = jnp.result_type(*[a for a in arrays if a is not None])
    return jnp.promote_types(dt, jnp.float32) if jnp.issubdtype(dt, jnp.floating) else jnp.dtype(jnp.float32)


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
      chunk_size: time steps per chunk of the ``xla`` backend (block size of kernel
        backends); None picks a default.
      backend: ``"reference"``, ``"xla"``, ``"pallas_gpu"`` or ``"pallas_tpu"``; None picks by
        platform (``MNEMAX_KERNEL_BACKEND`` overrides).
      interpret: run a Pallas backend in interpret mode (CPU); None reads
        ``MNEMAX_PALLAS_INTERPRET``.

    Returns:
      ``y`` (batch, time, channels), or ``(y, h_last)`` with ``return_state=True``.
    """
    _validate(x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk_size)
    if resets is not None:
        resets = jnp.asarray(resets).astype(bool)
    out_dtype = jnp.result_type(x) if z is None else jnp.result_type(x, z)
    name, impl = dispatch.resolve(OP, backend)
    kw = {"interpret": dispatch.interpret_flag(interpret)} if name.startswith("pallas") else {}

    def run(x, dt, A, B, C, D, z, dt_bias, h0, resets):
        y, h = impl(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, h0=h0,
                    resets=resets, return_state=return_state, chunk_size=chunk_size, **kw)
        return (y, h) if return_state else y

    args = (x, dt, A, B, C, D, z, dt_bias, h0, resets)
    rows, cols = dispatch.mesh_split(x.shape[0], x.shape[2]) if name.startswith("pallas") else (None, None)
    if rows is None and cols is None:
        out = run(*args)
    else:  # the kernel per (batch, channel) shard: see dispatch.mesh_split
        P = jax.sharding.PartitionSpec
        seq, ch, rows_only = P(rows, None, cols), P(cols), P(rows)
        specs = (seq, seq, P(cols, None), rows_only, rows_only, ch, seq, ch, P(rows, cols, None), rows_only)
        specs = tuple(None if a is None else sp for a, sp in zip(args, specs))
        out = jax.shard_map(run, in_specs=specs, out_specs=(seq, P(rows, cols, None)) if return_state else seq,
                            check_vma=False)(*args)
    y, h = out if return_state else (out, None)
    y = y.astype(out_dtype)
    return (y, h) if return_state else y


def effective_dt(dt, dt_bias, dt_softplus, cdt):
    """``softplus(dt + dt_bias)`` (or without softplus/bias) in the compute dtype."""
    dt = dt.astype(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(cdt)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def finish(y, x, D, z, cdt):
    """Adds the ``D`` skip and applies the ``silu(z)`` gate (compute dtype)."""
    if D is not None:
        y = y + x.astype(cdt) * D.astype(cdt)
    if z is not None:
        y = y * jax.nn.silu(z.astype(cdt))
    return y


# ----------------------------------------------------------------------------- reference


@dispatch.register(OP, "reference")
def _reference(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets, return_state, chunk_size):
    del chunk_size
    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, h0)
    batch, time, channels = x.shape
    dt = effective_dt(dt, dt_bias, dt_softplus, cdt)
    A = A.astype(cdt)
    h = jnp.zeros((batch, channels, A.shape[1]), cdt) if h0 is None else h0.astype(cdt)
    cut = jnp.zeros((batch, time), bool) if resets is None else resets

    def step(h, inputs):
        x_t, dt_t, B_t, C_t, cut_t = inputs
        h = jnp.where(cut_t[:, None, None], jnp.zeros_like(h), h)
        h = jnp.exp(dt_t[:, :, None] * A) * h + (dt_t * x_t)[:, :, None] * B_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, C_t)

    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (x.astype(cdt), dt, B.astype(cdt), C.astype(cdt), cut))
    h, ys = lax.scan(step, h, xs)
    y = finish(jnp.moveaxis(ys, 0, 1), x, D, z, cdt)
    return y, (h if return_state else None)


# ----------------------------------------------------------------------------- xla


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


@dispatch.register(OP, "xla")
def _xla(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets, return_state, chunk_size):
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


# ----------------------------------------------------------------------------- pallas


def _dtypes(x, dt, z):
    return {"x": jnp.result_type(x), "dt": jnp.result_type(dt), "z": None if z is None else jnp.result_type(z)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def _pallas_scan(x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, softplus, chunk, interpret):
    from . import pallas_selective_scan as pss

    resets = None if keep is None else keep < 0.5
    # no backward follows this call (jax.custom_vjp runs _pallas_fwd under differentiation):
    # the GPU forward takes its own, longer chunk
    p = pss.make_problem(platform, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk, training=False)
    out_dtype = jnp.result_type(x) if z is None else jnp.result_type(x, z)
    y, h_last, _ = pss.forward(platform, p, out_dtype, interpret=_interp(platform, interpret))
    return y, h_last


def _interp(platform, interpret):
    if interpret and platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return bool(interpret)


def _pallas_fwd(x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, softplus, chunk, interpret):
    from . import pallas_selective_scan as pss

    resets = None if keep is None else keep < 0.5
    p = pss.make_problem(platform, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk)
    out_dtype = jnp.result_type(x) if z is None else jnp.result_type(x, z)
    y, h_last, bounds = pss.forward(platform, p, out_dtype, save_bounds=True, interpret=_interp(platform, interpret))
    return (y, h_last), (x, dt, A, B, C, D, z, dt_bias, h0, keep, bounds)


def _pallas_bwd(platform, softplus, chunk, interpret, res, cts):
    from . import pallas_selective_scan as pss

    x, dt, A, B, C, D, z, dt_bias, h0, keep, bounds = res
    gy, gh_last = cts
    resets = None if keep is None else keep < 0.5
    p = pss.make_problem(platform, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk)
    g = pss.backward(platform, p, gy, gh_last, bounds, _dtypes(x, dt, z), interpret=_interp(platform, interpret))

    def cast(v, like):
        return None if like is None else v.astype(jnp.result_type(like))

    return (
        cast(g["x"], x), cast(g["dt"], dt), cast(g["A"], A), cast(g["B"], B), cast(g["C"], C), cast(g["D"], D),
        cast(g["z"], z), cast(g["dt_bias"], dt_bias), cast(g["h0"], h0), None if keep is None else jnp.zeros_like(keep),
    )


_pallas_scan.defvjp(_pallas_fwd, _pallas_bwd)


MIN_SEGMENT = 512  # time_split="auto": the shortest segment worth a separate program


def _time_segments(platform, batch, time, chans, interpret) -> int:
    """How many segments ``_split_scan`` cuts the sequence into (GPU_OPTIONS["time_split"])."""
    from . import pallas_selective_scan as pss

    opt = pss.GPU_OPTIONS["time_split"]
    if platform != "gpu":
        return 1
    if opt == "auto":
        if interpret:
            return 1
        try:
            sms = int(jax.devices("gpu")[0].core_count)
        except RuntimeError:  # lowered for cuda on a machine without a GPU: nothing to fill
            return 1
        ctas = batch * -(-chans // pss.LANES)
        segments = min(sms // ctas, time // MIN_SEGMENT)
        return segments if segments >= 4 else 1
    if not isinstance(opt, int) or opt < 1:
        raise ValueError(f"time_split: got {opt!r}, expected 'auto' or a positive integer")
    return opt


def _split_scan(x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, softplus, chunk, interpret, segments):
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
    bt, time, ch = x.shape
    seg_len = -(-time // segments)
    seg_len += (-seg_len) % 8
    full = -(-time // seg_len) - 1  # full segments before the last
    if full < 1:
        return _pallas_scan(x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, softplus, chunk, interpret)
    head = full * seg_len

    def cut(v):  # (bt, time, ...) -> (bt * full, seg_len, ...): the full segments as rows
        return None if v is None else v[:, :head].reshape((bt * full, seg_len) + v.shape[2:])

    xs, dts, bs, cs, zs, ks = (cut(v) for v in (x, dt, B, C, z, keep))
    _, ends = _pallas_scan(xs, dts, A, bs, cs, D, zs, dt_bias, None, ks, platform, softplus, chunk, interpret)
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
    y_head, _ = _pallas_scan(xs, dts, A, bs, cs, D, zs, dt_bias, starts, ks, platform, softplus, chunk, interpret)

    def tail(v):
        return None if v is None else v[:, head:]

    y_tail, h_last = _pallas_scan(tail(x), tail(dt), A, tail(B), tail(C), D, tail(z), dt_bias, last_start, tail(keep),
                                  platform, softplus, chunk, interpret)
    return jnp.concatenate([y_head.reshape(bt, head, ch), y_tail], axis=1), h_last


def _pallas(platform, x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets, return_state, chunk_size, interpret=False):
    if jnp.dtype(compute_dtype(x, dt, A, B, C, D, z, dt_bias, h0)) == jnp.float64:
        # The kernels compute in float32; float64 takes the XLA path.
        return _xla(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, h0=h0, resets=resets,
                    return_state=return_state, chunk_size=chunk_size)
    keep = None if resets is None else 1.0 - resets.astype(jnp.float32)
    args = (x, dt, A, B, C, D, z, dt_bias, h0, keep, platform, bool(dt_softplus), chunk_size, bool(interpret))
    segments = _time_segments(platform, x.shape[0], x.shape[1], x.shape[2], bool(interpret))
    y, h = _split_scan(*args, segments) if segments > 1 else _pallas_scan(*args)
    return y, (h if return_state else None)


@dispatch.register(OP, "pallas_gpu")
def _pallas_gpu(x, dt, A, B, C, **kw):
    return _pallas("gpu", x, dt, A, B, C, **kw)


@dispatch.register(OP, "pallas_tpu")
def _pallas_tpu(x, dt, A, B, C, **kw):
    return _pallas("tpu", x, dt, A, B, C, **kw)
