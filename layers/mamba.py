"""Mamba: the selective state-space mixer and its pre-norm residual block.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023);
the layout and inits of the reference code (state-spaces/mamba ``mamba_simple.py``,
the same layout as ``transformers``' ``MambaMixer``). With E = expand * d_model inner
channels, R = dt_rank and N = d_state::

    (x, z)      = in_proj(u)                                  d_model -> 2 E
    x           = silu(conv1d(x))                             depthwise causal, width d_conv
    (dt, B, C)  = x_proj(x)                                   E -> R + 2 N
    dt          = softplus(dt_proj(dt) + dt_bias)             R -> E
    y           = selective_scan(x, dt, A = -exp(A_log), B, C) + D x
    out         = out_proj(y * silu(z))                       E -> d_model

and the block ``out = residual + Mixer(RMSNorm(u))`` with the residual in float32
(:class:`MambaBlock` holds its mixer: ``MambaBlock(mixer=MambaMixer(features=d))``).
The scan is :func:`mnemax.kernels.selective_scan` (``backend`` picks reference / xla /
kernels; ``chunk_size`` is passed on).

Inits (reference): A_log = log(1..N) per channel (S4D-Real), D = 1, dt_proj weight
U(-s, s) with s = dt_scale R^-1/2 (or the constant s), dt_bias = softplus^-1(dt) with
dt log-uniform in [dt_min, dt_max] floored at dt_init_floor, in/x/out projections and
the conv as PyTorch's defaults (U(+-1/sqrt(fan_in))), biases of in/out projections zero,
out_proj divided by sqrt(n_layers) when ``rescale_prenorm_residual``.

State: the last d_conv - 1 conv inputs and the SSM state, float32::

    y, state = MambaMixer(features=d)(u, state, resets)
    u, y: (batch, time, d)
    state: MambaState(conv=(batch, d_conv - 1, E), ssm=(batch, E, N))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.kernels import selective_scan
from mnemax.kernels.selective_scan import SelectiveScanConfig
from mnemax.kernels.sharding import KernelSharding

from .base import Dtype, begin_call, check_sequence, compute_dtype, partitioned, state_dtype
from .conv import CausalConv1d, ConvState
from .norms import RMSNorm


class MambaState(NamedTuple):
    conv: jax.Array  # (batch, d_conv - 1, d_inner): the last conv inputs
    ssm: jax.Array  # (batch, d_inner, d_state)


def fan_in_uniform(fan_in: int, scale: float = 1.0):
    """PyTorch's default Linear/Conv init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times ``scale``."""
    bound = scale / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
    """softplus^-1 of dt ~ exp(U(log dt_min, log dt_max)), floored at ``floor``."""

    def init(key, shape, dtype=jnp.float32):
        log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


class MambaMixer(nn.Module):
    """The Mamba mixer (see module docstring).

    Attributes:
      features: d_model.
      d_state, d_conv, expand: N, the conv width and E / d_model.
      dt_rank: R, or ``"auto"`` for ceil(d_model / 16).
      dt_min, dt_max, dt_init ("random" | "constant"), dt_scale, dt_init_floor: dt inits.
      conv_bias: bias in the conv; use_bias: biases in in_proj and out_proj.
      n_layers, rescale_prenorm_residual: out_proj init divided by sqrt(n_layers).
      backend, chunk_size: passed to :func:`mnemax.kernels.selective_scan`.
      kernel_config, kernel_sharding: passed to it as ``config`` (the Pallas kernels'
        tuning; None: the defaults) and ``sharding`` (the mesh axes splitting the batch and
        the inner channels, needed for a Pallas backend under a mesh of several devices).
    """

    features: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init: str = "random"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    use_bias: bool = False
    n_layers: int = 1
    rescale_prenorm_residual: bool = True
    backend: str | None = None
    chunk_size: int | None = None
    kernel_config: SelectiveScanConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.features)

    @property
    def rank(self) -> int:
        if self.dt_rank == "auto":
            return math.ceil(self.features / 16)
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        return self.dt_rank

    def _check_config(self):
        if self.d_conv < 1 or self.d_state < 1 or self.d_inner < 1:
            raise ValueError(
                f"d_conv, d_state and expand * features must be >= 1, got {self.d_conv}, {self.d_state}, {self.d_inner}"
            )
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        self.rank  # noqa: B018 - validates dt_rank

    def initial_state(self, batch_size: int) -> MambaState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        return MambaState(
            conv=jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), sdt),
            ssm=jnp.zeros((batch_size, self.d_inner, self.d_state), sdt),
        )

    @nn.compact
    def __call__(self, u, state: MambaState | None = None, resets=None):
        self._check_config()
        _, _, resets, state, _ = begin_call(self, u, self.features, state, resets)
        cdt = compute_dtype(self.dtype, u)
        E, N, R, d = self.d_inner, self.d_state, self.rank, self.features
        pdt = self.param_dtype

        def dense(features, fan_in, names, name, use_bias, kernel_init=None, axis=-1):
            return nn.DenseGeneral(
                features, axis=axis, use_bias=use_bias, dtype=cdt, param_dtype=pdt,
                kernel_init=partitioned(kernel_init or fan_in_uniform(fan_in), names),
                bias_init=partitioned(nn.initializers.zeros, names[1:]), name=name,
            )

        xz = dense((2, E), d, ("embed", None, "mlp"), "in_proj", self.use_bias)(u)
        x, z = xz[..., 0, :], xz[..., 1, :]
        x, conv_state = CausalConv1d(
            features=E, width=self.d_conv, use_bias=self.conv_bias, axis_name="mlp",
            dtype=cdt, param_dtype=pdt, name="conv1d",
        )(x, ConvState(state.conv), resets)
        x = jax.nn.silu(x)
        x_dbl = dense(R + 2 * N, E, ("mlp", None), "x_proj", False)(x)
        dt_low, B, C = jnp.split(x_dbl, [R, R + N], axis=-1)
        s = self.dt_scale / math.sqrt(R)
        dt_kernel_init = (
            (lambda k, shape, dtype=jnp.float32: jax.random.uniform(k, shape, dtype, -s, s))
            if self.dt_init == "random"
            else nn.initializers.constant(s)
        )
        dt = dense(E, R, (None, "mlp"), "dt_proj", False, dt_kernel_init)(dt_low)
        dt_bias = self.param("dt_bias", partitioned(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), ("mlp",)), (E,), pdt)
        A_log = self.param(
            "A_log",
            partitioned(lambda k, shape, dtype=jnp.float32: jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=dtype)), shape), ("mlp", "state")),
            (E, N), pdt,
        )
        D = self.param("D", partitioned(nn.initializers.ones, ("mlp",)), (E,), pdt)
        A = -jnp.exp(A_log.astype(jnp.promote_types(pdt, jnp.float32)))
        y, h = selective_scan(
            x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, h0=state.ssm, resets=resets,
            return_state=True, chunk_size=self.chunk_size, backend=self.backend, config=self.kernel_config,
            sharding=self.kernel_sharding,
        )
        out_scale = 1.0 / math.sqrt(self.n_layers) if self.rescale_prenorm_residual else 1.0
        out = dense(d, E, ("mlp", "embed"), "out_proj", self.use_bias, fan_in_uniform(E, out_scale))(y.astype(cdt))
        sdt = state_dtype(self.dtype)
        return out, MambaState(conv=conv_state.inputs.astype(sdt), ssm=h.astype(sdt))


class MambaBlock(nn.Module):
    """``out = residual + mixer(RMSNorm(u))``: the pre-norm residual block around a
    :class:`MambaMixer` it holds; the residual and the output are float32 when
    ``residual_in_fp32`` (the reference default).

    Attributes:
      mixer: the MambaMixer (an unbound module: built outside any module, or with
        ``parent=None`` inside one); its parameters are the block's ``mixer``, its state
        the block's. The norm runs in the mixer's dtype and param_dtype.
      norm_eps: epsilon of the RMSNorm (``norm``).
      residual_in_fp32: keep the residual stream in float32.
    """

    mixer: MambaMixer
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True

    @property
    def features(self) -> int:
        return self.mixer.features

    def initial_state(self, batch_size: int) -> MambaState:
        return self.mixer.initial_state(batch_size)

    @nn.compact
    def __call__(self, u, state: MambaState | None = None, resets=None):
        check_sequence(u, self.features, name="x")
        y, state, _ = mamba_residual(self, u, state, resets)
        return y, state


def mamba_residual(block, u, state: MambaState | None, resets):
    """``u + block.mixer(RMSNorm(u))`` for ``block`` (a MambaBlock, or a block with the same
    ``mixer``, ``norm_eps`` and ``residual_in_fp32`` fields), with the norm as its submodule
    ``norm``; call it from the block's compact method. Returns (output, mixer state, the
    normed input)."""
    mixer = block.mixer
    h, _ = RMSNorm(eps=block.norm_eps, dtype=mixer.dtype, param_dtype=mixer.param_dtype, name="norm")(u)
    m, state = mixer(h, state, resets)
    residual = u.astype(jnp.promote_types(u.dtype, jnp.float32)) if block.residual_in_fp32 else u
    return residual + m.astype(residual.dtype), state, h
