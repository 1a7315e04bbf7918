"""What every ``linear_scan`` backend shares: input checks, the reset masks, the
closed-form one-step update, the kernel configuration and the kernels' layout.

The recurrence ``h_t = a_t * h_{t-1} + b_t`` (diagonal, elementwise). Shapes: ``b`` is
``(batch, time, *rest)``; ``a`` broadcasts to ``b``; ``h0`` is ``(batch, *rest)``;
``resets`` is ``(batch, time)`` bool. Where ``resets[:, t]`` the carried state is cleared
before step ``t``; with ``reverse=True`` the recurrence runs backwards,
``h_t = a_t * h_{t+1} + b_t``, and the carry from step ``t`` into ``t - 1`` is dropped
where ``resets[:, t]``.

The Pallas kernels see ``(batch, time_p, lanes_p)`` (:class:`Layout`: trailing dims
flattened to channels, padded to 128 lanes, time padded to whole chunks), with bf16
pairs packed as uint32 on the GPU.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from ..checks import bool_resets, float_array

OP = "linear_scan"
LANES = 128


# ----------------------------------------------------------------------------- the configuration


@dataclasses.dataclass(frozen=True)
class LinearScanConfig:
    """The Pallas kernels' tuning, a static (hashable) argument of ``linear_scan``; the
    defaults are the fastest measured on an H100 (benchmarks/RESULTS.md, "linear_scan":
    bf16 (8, 4096, 4096) forward, packed chunk 32 with 2 stages against chunk 64, 3 stages,
    and unpacked lanes).

    Attributes:
      chunk: GPU: time steps per pipeline tile.
      stages: GPU: tiles the pipeline loads ahead (TMA).
      pack_bf16: GPU: move bf16 sequences as uint32 pairs (two channels per lane).
      tpu_chunk: TPU: time steps per grid step (a multiple of 16, the bf16 sublane tile).
    """

    chunk: int = 32
    stages: int = 2
    pack_bf16: bool = True
    tpu_chunk: int = 32

    def __post_init__(self):
        for name in ("chunk", "stages", "tpu_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LinearScanConfig.{name}: got {value!r}, expected a positive integer")
        if self.tpu_chunk % 16:
            raise ValueError(f"LinearScanConfig.tpu_chunk: got {self.tpu_chunk!r}, expected a multiple of 16 "
                             "(Mosaic TPU tiles)")
        if not isinstance(self.pack_bf16, bool):
            raise ValueError(f"LinearScanConfig.pack_bf16: got {self.pack_bf16!r}, expected True or False")


def config_or_default(config) -> LinearScanConfig:
    """``config``, or the defaults for None; TypeError for anything else."""
    if config is None:
        return LinearScanConfig()
    if not isinstance(config, LinearScanConfig):
        raise TypeError(f"config must be a LinearScanConfig or None, got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------- checks and masks


def compute_dtype(*dtypes) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def prepare(a, b, h0, resets):
    """Validates shapes; returns a (broadcast), b, h0 (compute dtype), resets, the output
    dtype and the compute dtype."""
    b = float_array("b", b, complex_ok=True)
    a = float_array("a", a, complex_ok=True)
    if b.ndim < 2:
        raise ValueError(f"b must have shape (batch, time, ...), got shape {b.shape}")
    try:
        shape = jnp.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        shape = None
    if shape != b.shape:
        raise ValueError(f"a must broadcast to b's shape {b.shape}, got shape {a.shape}")
    out_dtype = jnp.result_type(a, b)
    cdt = compute_dtype(a.dtype, b.dtype)
    a = jnp.broadcast_to(a, b.shape)
    state_shape = (b.shape[0],) + b.shape[2:]
    if h0 is not None:
        h0 = float_array("h0", h0, complex_ok=True)
        if h0.shape != state_shape:
            raise ValueError(f"h0 must have shape (batch, ...) = {state_shape}, got shape {h0.shape}")
        h0 = h0.astype(cdt)
    resets = bool_resets(resets, *b.shape[:2])
    return a, b, h0, resets, out_dtype, cdt


def expand(r, ndim):
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


def fold_resets(a, resets, reverse):
    """Folds ``resets`` into the decays: the carry into a cut step is multiplied by 0."""
    if resets is None:
        return a
    keep = 1.0 - expand(carry_mask(resets, reverse), a.ndim).astype(a.dtype)
    return a * keep


def zeros_state(b, h0, dtype):
    """``h0`` in ``dtype``, or zeros of the state shape (batch, *rest)."""
    return jnp.zeros((b.shape[0],) + b.shape[2:], dtype) if h0 is None else h0.astype(dtype)


def one_step(a, b, h0, resets, reverse, cdt):
    """The recurrence for a sequence of one step (generation), in closed form:
    ``h_1 = a_1 * h0 + b_1`` (``h0`` dropped where the step is cut), in the compute dtype,
    with no padding and no kernel; JAX differentiates it. Returns (batch, 1, *rest)."""
    h = zeros_state(b, h0, cdt)
    if resets is not None:
        cut = carry_mask(resets, reverse)[:, 0]
        h = jnp.where(cut.reshape(cut.shape + (1,) * (h.ndim - 1)), jnp.zeros_like(h), h)
    return (a[:, 0].astype(cdt) * h + b[:, 0].astype(cdt))[:, None]


# ----------------------------------------------------------------------------- the kernels' layout


def pad_to(x, axis: int, multiple: int, front: bool = False):
    """Zero-pads ``axis`` to a multiple; ``front`` pads before the data (the time axis of
    reverse scans, so that padded steps come after the real ones)."""
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, 0) if front else (0, pad)
    return jnp.pad(x, widths)


class Layout:
    """Maps (batch, time, *rest) arrays to the kernels' (batch, time_p, lanes_p) view."""

    def __init__(self, shape, chunk: int, reverse: bool, packed: bool):
        self.shape, self.chunk, self.reverse, self.packed = tuple(shape), chunk, reverse, packed
        self.batch, self.time = shape[0], shape[1]
        self.chans = 1
        for d in shape[2:]:
            self.chans *= d
        self.width = 2 * LANES if packed else LANES
        self.time_p = self.time + (-self.time) % chunk
        self.chans_p = self.chans + (-self.chans) % self.width
        self.lanes_p = self.chans_p // 2 if packed else self.chans_p
        self.n_chunks = self.time_p // chunk
        self.k = 2 if packed else 1  # carries per lane

    def seq(self, x):
        x = jnp.broadcast_to(x, self.shape).reshape(self.batch, self.time, self.chans)
        x = pad_to(pad_to(x, 1, self.chunk, self.reverse), 2, self.width)
        if self.packed:
            x = lax.bitcast_convert_type(x.astype(jnp.bfloat16).reshape(self.batch, self.time_p, -1, 2), jnp.uint32)
        return x

    def unseq(self, x, dtype):
        if self.packed:
            x = lax.bitcast_convert_type(x, jnp.bfloat16).reshape(self.batch, self.time_p, -1)
        x = x[:, self.time_p - self.time :] if self.reverse else x[:, : self.time]
        return x[:, :, : self.chans].reshape(self.shape).astype(dtype)

    def state(self, h):
        """(batch, *rest) float32 -> (batch, k, lanes_p)."""
        h = pad_to(h.reshape(self.batch, self.chans).astype(jnp.float32), 1, self.width)
        if self.packed:
            return jnp.swapaxes(h.reshape(self.batch, -1, 2), 1, 2)
        return h[:, None, :]

    def unstate(self, h):
        """(batch, k, lanes_p) -> (batch, *rest)."""
        h = jnp.swapaxes(h, 1, 2).reshape(self.batch, -1) if self.packed else h[:, 0]
        return h[:, : self.chans].reshape((self.batch,) + self.shape[2:])
