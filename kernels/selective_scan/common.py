"""What every ``selective_scan`` backend shares: input checks, the compute dtype, the
closed-form one-step update, the kernel configuration, and the kernels' packed problem.

The recurrence, its equations and the shapes are in the package docstring
(:mod:`mnemax.kernels.selective_scan`).

The kernels' view of a call (:class:`Problem`): channels on the 128 lanes, time padded
to whole chunks, and the per-step shared vectors B_t, C_t and the reset flag packed as
one float32 row ``bc = [B_t, C_t, keep_t, valid_t, off_t, 0...]`` (``off_t``: the reset
as an offset of the decay's exponent, ``RESET_OFFSET`` or 0; ``valid`` is 0 on the steps
that pad the sequence to whole chunks: their dt is zeroed, so the state passes through
them), so that a chunk of them is one tile.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ..checks import bool_resets, float_array

OP = "selective_scan"
LANES = 128
LOG2E = math.log2(math.e)
RESET_OFFSET = -1e30  # added to a reset step's decay exponent: exp2 of it is 0
MIN_SEGMENT = 512  # time_split="auto": the shortest segment worth a separate program


# ----------------------------------------------------------------------------- the configuration


def _positive_int(name, value, what="a positive integer"):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SelectiveScanConfig.{name}: got {value!r}, expected {what}")


def _auto_or_positive_int(name, value, what="'auto' or a positive integer"):
    if value != "auto":
        _positive_int(name, value, what)


def _flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"SelectiveScanConfig.{name}: got {value!r}, expected True or False")


BWD_LAYOUTS = ("auto", "lanes", "channels")


@dataclasses.dataclass(frozen=True)
class SelectiveScanConfig:
    """The Pallas kernels' tuning, a static (hashable) argument of ``selective_scan``. The
    defaults are the fastest measured on an H100 (benchmarks/RESULTS.md, "selective_scan").

    GPU (Mosaic GPU):

    Attributes:
      chunk: time steps per chunk of the training forward and the backward (the backward
        restarts from the forward's chunk-boundary states).
      fwd_chunk: the chunk of a forward with no backward after it (inference, prefill,
        evaluation); "auto": 32 steps for 16-bit sequences, 16 for float32. At (8, 2048,
        1536, 16): f32 0.356 ms at 16, 0.399 at 32; bf16 0.337 at 32.
      stages: chunks the forwards' pipelines load ahead (TMA).
      bwd_stages: the same for the backwards (3 no longer fits 3 CTAs per SM in the lanes
        backward: 1.622 ms against 1.156).
      unroll, bwd_unroll: rows unrolled per loop iteration of the one-lane-per-channel
        training forward / backward (True: all).
      approx_math, no_auto_barriers: Mosaic GPU compiler flags (approximate exp2;
        no automatic barrier per row: 0.126 against 0.140 ms).
      red_rows: steps whose dB/dC lane products the one-lane-per-channel backward sums in
        one pass (the largest divisor of the chunk up to it; 4 steps 2.131 ms, 2 steps
        2.121, per-step sums 6.07).
      bwd_layout: the layout of the training forward and the backward. "lanes": each
        channel's states over the 4 lanes of a quad, 32 channels per CTA
        (:mod:`.gpu_lanes`, :mod:`.gpu_lanes_bwd`; a state of at most 16); "channels": one
        lane per channel, 128 channels per CTA (:mod:`.gpu_channels`); "auto": "lanes" up
        to 16 states, else "channels" (at (8, 2048, 1536, 16) f32, fwd+bwd 1.156 ms
        against 1.869). A forward with no backward always runs the lanes kernel.
      lanes_group: rows of the lanes forward whose loads are issued before their
        arithmetic (8: 0.248 ms; 4: 0.259; 16: 0.247).
      lanes_bwd_group: the same for the lanes backward (4: 1.234 ms; 1: 1.259; 8: 1.609).
      lanes_train_chunk: tile rows of the lanes training forward; "auto": twice the chunk
        where the padded length allows (a bound still saved every chunk; 1.156 ms
        against 1.165 at 8).
      time_split: segments of the sequence scanned in parallel (1 = off); "auto": as many
        as fill the GPU's SMs where batch x channel blocks leaves most of them idle, at
        least 4 of at least ``MIN_SEGMENT`` steps (batch 1 at 1536 channels: 12 CTAs on 132
        SMs; (1, 65536, 1536, 16) bf16 fwd 3.37 -> 3.19 ms with the lanes forward).
      mosaic_interpret: interpret mode only: run the one-lane-per-channel training
        forward's Mosaic GPU kernel under Mosaic GPU's interpreter (threads, barriers and
        TMA simulated) instead of Pallas' grid emulation.

    TPU (Mosaic TPU):

    Attributes:
      tpu_chunk: time steps per grid step (a multiple of 8, the sublane tile).

    ``chunk_size=`` of ``selective_scan``, where given, overrides ``chunk``, ``fwd_chunk``
    and ``tpu_chunk``.
    """

    chunk: int = 8
    fwd_chunk: int | str = "auto"
    stages: int = 3
    bwd_stages: int = 2
    unroll: int | bool = 4
    bwd_unroll: int = 2
    approx_math: bool = True
    no_auto_barriers: bool = True
    red_rows: int = 4
    bwd_layout: str = "auto"
    lanes_group: int = 8
    lanes_bwd_group: int = 4
    lanes_train_chunk: int | str = "auto"
    time_split: int | str = "auto"
    mosaic_interpret: bool = False
    tpu_chunk: int = 16

    def __post_init__(self):
        for name in ("chunk", "stages", "bwd_stages", "bwd_unroll", "red_rows", "lanes_group", "lanes_bwd_group"):
            _positive_int(name, getattr(self, name))
        for name in ("fwd_chunk", "lanes_train_chunk", "time_split"):
            _auto_or_positive_int(name, getattr(self, name))
        if self.unroll is not True:
            _positive_int("unroll", self.unroll, "a positive integer (rows unrolled per loop iteration) or True")
        for name in ("approx_math", "no_auto_barriers", "mosaic_interpret"):
            _flag(name, getattr(self, name))
        if self.bwd_layout not in BWD_LAYOUTS:
            raise ValueError(f"SelectiveScanConfig.bwd_layout: got {self.bwd_layout!r}, expected one of {BWD_LAYOUTS}")
        _positive_int("tpu_chunk", self.tpu_chunk, "a positive multiple of 8 (Mosaic TPU's sublane tile)")
        if self.tpu_chunk % 8:
            raise ValueError(f"SelectiveScanConfig.tpu_chunk: got {self.tpu_chunk!r}, expected a positive multiple of 8 "
                             "(Mosaic TPU's sublane tile)")


def config_or_default(config) -> SelectiveScanConfig:
    """``config``, or the defaults for None; TypeError for anything else."""
    if config is None:
        return SelectiveScanConfig()
    if not isinstance(config, SelectiveScanConfig):
        raise TypeError(f"config must be a SelectiveScanConfig or None, got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------- checks and dtypes


def _shape(v):
    return getattr(v, "shape", None)


def _check(name, value, want, what):
    if _shape(value) != want:
        raise ValueError(f"{name} must have shape {what} = {want}, got shape {_shape(value)}")


def validate(x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk_size):
    """ValueError/TypeError naming the argument whose shape or dtype is wrong."""
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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def compute_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when any input is float64."""
    dt = jnp.result_type(*[a for a in arrays if a is not None])
    return jnp.promote_types(dt, jnp.float32) if jnp.issubdtype(dt, jnp.floating) else jnp.dtype(jnp.float32)


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


def one_step(x, dt, A, B, C, *, D, z, dt_bias, dt_softplus, h0, resets):
    """The recurrence for a sequence of one step (generation), in closed form: the
    module docstring's equations once, in the compute dtype, with no chunk padding and no
    kernel; JAX differentiates it. Returns ``(y (batch, 1, channels), h (batch, channels,
    state))``."""
    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, h0)
    batch, _, channels = x.shape
    dt1 = effective_dt(dt[:, 0], dt_bias, dt_softplus, cdt)
    x1 = x[:, 0].astype(cdt)
    h = jnp.zeros((batch, channels, A.shape[1]), cdt) if h0 is None else h0.astype(cdt)
    if resets is not None:
        h = jnp.where(resets[:, 0, None, None], jnp.zeros_like(h), h)
    h = jnp.exp(dt1[:, :, None] * A.astype(cdt)) * h + (dt1 * x1)[:, :, None] * B[:, 0, None, :].astype(cdt)
    y = jnp.einsum("bdn,bn->bd", h, C[:, 0].astype(cdt))[:, None]
    return finish(y, x, D, z, cdt), h


# ----------------------------------------------------------------------------- the kernels' problem


def pad_to(x, axis: int, multiple: int, value=0):
    """``x`` padded with ``value`` at the end of ``axis`` to a multiple of ``multiple``."""
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


class Problem:
    """The kernels' view of one call: padded, packed inputs and the static sizes."""

    def __init__(self, x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk, softplus, state_multiple=1, bc_multiple=8,
                 unroll=True, bwd_unroll=None, red_rows=0, red_multiple=4):
        batch, time, chans = x.shape
        self.n_real = A.shape[1]
        n = self.n_real + (-self.n_real) % state_multiple
        if n != self.n_real:  # zero-padded states: B = C = 0, h0 = 0, so they stay 0 and add nothing
            A = pad_to(A, 1, state_multiple)
            B, C = pad_to(B, 2, state_multiple), pad_to(C, 2, state_multiple)
            h0 = None if h0 is None else pad_to(h0, 2, state_multiple)
        self.batch, self.time, self.chans, self.n = batch, time, chans, n
        self.chunk, self.softplus, self.gated, self.unroll = chunk, softplus, z is not None, unroll
        self.has_resets = resets is not None
        self.bwd_unroll = unroll if bwd_unroll is None else bwd_unroll
        if red_rows and chunk % red_rows:
            raise ValueError(f"red_rows: {red_rows} does not divide the chunk ({chunk}); expected a divisor of it")
        # the one-lane-per-channel backward's batched lane sums: red_rows steps x (B, C) x state
        # rows per flush, padded to the row tiles of the register layout that reduces them
        self.red_rows = red_rows
        self.rows_pad = -(-red_rows * 2 * n // red_multiple) * red_multiple if red_rows else 0
        self.time_p = time + (-time) % chunk
        self.chans_p = chans + (-chans) % LANES
        self.n_chunks, self.n_blocks = self.time_p // chunk, self.chans_p // LANES
        self.bc_width = 2 * n + 3 + (-(2 * n + 3)) % bc_multiple
        f32 = jnp.float32

        def seq(v):  # (batch, time, chans) -> padded; padded steps have dt = 0 (no effect)
            return pad_to(pad_to(v, 1, chunk), 2, LANES)

        self.x, self.dt = seq(x), seq(dt)
        self.z = seq(z) if z is not None else None
        keep = jnp.ones((batch, time, 1), f32) if resets is None else 1.0 - resets.astype(f32)[..., None]
        valid = jnp.ones((batch, time, 1), f32)
        # the reset as an offset of the decay's exponent: exp2(delta a2 + off) is 0 where off =
        # RESET_OFFSET, so the forward drops the per-state (keep * h) multiply
        off = (1.0 - keep) * RESET_OFFSET
        bc = jnp.concatenate([B.astype(f32), C.astype(f32), keep, valid, off], axis=-1)
        # padded steps: B = C = 0, keep = 1, valid = 0, off = 0 (dt is zeroed there: the state passes unchanged)
        bc = pad_to(pad_to(bc, 2, bc_multiple), 1, chunk, value=0.0)
        self.bc = bc.at[:, time:, 2 * n].set(1.0) if self.time_p > time else bc
        # A^T (state, chans) in log2 units (exp(dt A) = exp2(dt A log2 e)); D and dt_bias rows.
        self.a2 = pad_to(A.astype(f32).T * LOG2E, 1, LANES)
        d = jnp.zeros((chans,), f32) if D is None else D.astype(f32)
        bias = jnp.zeros((chans,), f32) if dt_bias is None else dt_bias.astype(f32)
        self.params = pad_to(jnp.stack([d, bias]), 1, LANES)
        h0 = jnp.zeros((batch, chans, n), f32) if h0 is None else h0.astype(f32)
        self.h0 = pad_to(jnp.swapaxes(h0, 1, 2), 2, LANES)  # (batch, state, chans)


def pad_cotangents(p: Problem, gy, gh_last):
    """The output's cotangent padded like the sequences, and the final state's as
    (batch, padded state, padded chans) float32."""
    gy = pad_to(pad_to(gy, 1, p.chunk), 2, LANES)
    ghl = pad_to(pad_to(jnp.swapaxes(gh_last.astype(jnp.float32), 1, 2), 1, p.n), 2, LANES)
    return gy, ghl


def unpad_forward(p: Problem, y, h_last):
    """The kernels' padded y (batch, time_p, chans_p) and final state (batch, state, chans_p)
    -> y (batch, time, chans) and h (batch, chans, state)."""
    return y[:, : p.time, : p.chans], jnp.swapaxes(h_last[:, : p.n_real, : p.chans], 1, 2)


def unpad_gradients(p: Problem, outs, dbc_rows: int = 0):
    """The gradients (dict: x, dt, z, B, C, A, D, dt_bias, h0; unpadded) from the outputs of
    a backward kernel that keeps the problem's layout: dx, ddt, (dz), the per-block dB/dC
    partials (batch, blocks, time_p, bc_width), or with ``dbc_rows`` (batch, blocks,
    time_p // dbc_rows, rows) holding ``dbc_rows`` steps per row, dA partials (batch,
    state, chans_p), dD/dbias partials (batch, 2, chans_p), dh0 (batch, state, chans_p)."""
    if p.gated:
        dx, ddt, dz, dbc, dA, dp, dh0 = outs
    else:
        (dx, ddt, dbc, dA, dp, dh0), dz = outs, None
    T, Cn, n = p.time, p.chans, p.n_real
    dbc = jnp.sum(dbc, axis=1)
    if dbc_rows:  # (batch, time_p // rows, rows_pad) -> (batch, time_p, 2 state)
        dbc = dbc[..., : dbc_rows * 2 * p.n].reshape(p.batch, p.time_p, 2 * p.n)
    dbc = dbc[:, :T]
    return {
        "x": dx[:, :T, :Cn], "dt": ddt[:, :T, :Cn], "z": None if dz is None else dz[:, :T, :Cn],
        "B": dbc[..., :n], "C": dbc[..., p.n : p.n + n],
        "A": jnp.sum(dA, axis=0)[:n, :Cn].T, "D": jnp.sum(dp[:, 0, :Cn], axis=0), "dt_bias": jnp.sum(dp[:, 1, :Cn], axis=0),
        "h0": jnp.swapaxes(dh0[:, :n, :Cn], 1, 2),
    }


# ----------------------------------------------------------------------------- per-step math in the kernels


def softplus(u):
    """softplus as the kernels compute it (exp and log only; linear above 20)."""
    return jnp.where(u > 20.0, u, jnp.log(1.0 + jnp.exp(jnp.minimum(u, 20.0))))


def sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


def gpu_compiler_params(config: SelectiveScanConfig):
    """Mosaic GPU's compiler parameters of every GPU kernel of this op."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.CompilerParams(approx_math=config.approx_math, unsafe_no_auto_barriers=config.no_auto_barriers)


# ----------------------------------------------------------------------------- the time split


def time_segments(config: SelectiveScanConfig, platform: str, batch: int, time: int, chans: int, interpret: bool) -> int:
    """How many segments the sequence is cut into and scanned in parallel
    (``config.time_split``; GPU only, off in interpret mode for "auto")."""
    opt = config.time_split
    if platform != "gpu":
        return 1
    if opt == "auto":
        if interpret:
            return 1
        try:
            sms = int(jax.devices("gpu")[0].core_count)
        except RuntimeError:  # lowered for cuda on a machine without a GPU: nothing to fill
            return 1
        ctas = batch * -(-chans // LANES)
        segments = min(sms // ctas, time // MIN_SEGMENT)
        return segments if segments >= 4 else 1
    return opt
