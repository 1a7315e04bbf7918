"""Mamba-2: the SSD mixer and its pre-norm residual block.

Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (2024); the layout and inits of the reference code
(state-spaces/mamba ``mamba_ssm/modules/mamba2.py``, the same layout as ``transformers``'
``Mamba2Mixer``). With E = expand * d_model inner channels, H = E / P heads of P =
head_dim channels, N = d_state and G = n_groups groups of B and C::

    (z, xBC, dt)  = in_proj(u)                        d_model -> E + (E + 2 G N) + H
    xBC           = silu(conv1d(xBC))                 depthwise causal, width d_conv
    (x, B, C)     = xBC                               E = H * P, G * N, G * N channels
    dt            = softplus(dt + dt_bias)            (H,), clipped to dt_limit if set
    A             = -exp(A_log)                       (H,), one scalar decay rate per head

and per head h (group j = h // (H / G), whose B and C the head reads), each step t::

    S_t[h] = exp(dt_t[h] A[h]) S_{t-1}[h] + (dt_t[h] B_t[j]) x_t[h]^T      S[h]: (N, P)
    y_t[h] = S_t[h]^T C_t[j] + D[h] x_t[h]                                  (P,)

which is :func:`mnemax.kernels.gated_linear_attention` with the per-head log decay
``g = dt A``, ``q = C``, ``k = B`` (G grouped heads, each serving H / G value heads),
``v = dt x`` (``(dt B) x^T = B (dt x)^T``: dt goes with the per-head values, so the op takes B
and C once per group rather than repeated over the heads) and ``scale = 1`` (the SSD
chunkwise form on the ``xla`` backend, the closed-form step for one token), plus the D skip. Then
the gated RMSNorm (``norm_before_gate=False``) over G groups of E / G channels, and the
output projection::

    y   = y * silu(z)
    y   = y / sqrt(mean_group(y^2) + norm_eps) * norm.scale              per group of E / G
    out = out_proj(y)                                                      E -> d_model

and the block ``out = residual + Mixer(RMSNorm(u))`` with the residual in float32
(:class:`Mamba2Block` holds its mixer: ``Mamba2Block(mixer=Mamba2Mixer(features=d))``).

Inits (reference): A = U(A_init_range) per head and A_log = log A; D = 1; dt_bias =
softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] floored at dt_init_floor; the
gated norm's scale 1; in/out projections and the conv as PyTorch's defaults
(U(+-1/sqrt(fan_in))), biases of in/out projections zero, out_proj divided by
sqrt(n_layers) when ``rescale_prenorm_residual`` (mamba_ssm's ``_init_weights``).

State: the last d_conv - 1 conv inputs (pre-conv xBC) and the SSM state, float32::

    y, state = Mamba2Mixer(features=d)(u, state, resets)
    u, y: (batch, time, d)
    state: Mamba2State(conv=(batch, d_conv - 1, E + 2 G N), ssm=(batch, H, N, P))

The SSM state is the op's (batch, heads, d_k = N, d_v = P); ``transformers``' cache holds
its transpose (batch, heads, head_dim, state_size). ``resets`` clear both the conv taps
and the SSM state before the flagged steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.kernels import gated_linear_attention
from mnemax.kernels.chunked_gpu import ChunkedConfig
from mnemax.kernels.sharding import KernelSharding

from .base import Dtype, begin_call, compute_dtype, partitioned, state_dtype
from .conv import CausalConv1d, ConvState
from .mamba import MambaBlock, dt_bias_init, fan_in_uniform
from .norms import rms_norm


class Mamba2State(NamedTuple):
    conv: jax.Array  # (batch, d_conv - 1, d_inner + 2 n_groups d_state): the last pre-conv xBC inputs
    ssm: jax.Array  # (batch, heads, d_state, head_dim)


def A_log_init(low: float, high: float):
    """log(A) with A ~ U(low, high) per head (mamba_ssm's ``A_init_range``)."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

    return init


class GatedGroupRMSNorm(nn.Module):
    """``rmsnorm_groups(y * silu(z)) * scale``: Mamba-2's output norm with the gate applied
    before normalising (``norm_before_gate=False``), the RMS taken over ``groups`` equal
    groups of the last axis, in float32 (float64 for float64 inputs).

    ``y, z``: (..., features) -> (..., features) in the compute dtype."""

    groups: int = 1
    eps: float = 1e-5
    axis_name: str | None = "mlp"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y, z):
        features = y.shape[-1]
        if z.shape != y.shape:
            raise ValueError(f"z must have y's shape {y.shape}, got shape {z.shape}")
        if self.groups < 1 or features % self.groups:
            raise ValueError(f"groups must be >= 1 and divide the {features} features, got {self.groups}")
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (features,), self.param_dtype)
        f32 = jnp.promote_types(jnp.result_type(y, z), jnp.float32)
        h = y.astype(f32) * jax.nn.silu(z.astype(f32))
        h = rms_norm(h.reshape(*h.shape[:-1], self.groups, features // self.groups), eps=self.eps)
        h = h.reshape(y.shape) * scale.astype(f32)
        return h.astype(compute_dtype(self.dtype, y, z))


class Mamba2Mixer(nn.Module):
    """The Mamba-2 (SSD) mixer (see module docstring).

    Attributes:
      features: d_model.
      d_state: N, the state size per head (the size of B and C per group).
      d_conv: width of the causal conv over xBC.
      expand: E / d_model.
      head_dim: P; E must be a multiple of it (H = E / P heads).
      n_groups: G, the groups of B and C; divides H (head h reads group h // (H / G)).
      A_init_range: (low, high) of A = -exp(A_log)'s uniform init, as mamba_ssm (1, 16).
      dt_min, dt_max, dt_init_floor: dt_bias's init (log-uniform dt, floored).
      dt_limit: (low, high) clip of dt after the softplus (mamba_ssm's ``dt_limit``,
        ``transformers``' ``time_step_limit``); None: no clip (their default (0, inf)).
      conv_bias: bias in the conv; use_bias: biases in in_proj and out_proj.
      norm_eps: epsilon of the gated RMSNorm.
      n_layers, rescale_prenorm_residual: out_proj init divided by sqrt(n_layers).
      backend, chunk_size: passed to :func:`mnemax.kernels.gated_linear_attention`.
      kernel_config, kernel_sharding: passed to it as ``config`` (the Pallas GPU kernels'
        :class:`~mnemax.kernels.chunked_gpu.ChunkedConfig`) and ``sharding`` (the mesh axes
        splitting batch and heads; set by ``mnemax.build(..., kernel_sharding=)``). With
        ``ChunkedConfig(group_heads=num_heads // n_groups)`` one program runs all the heads of a
        group of B and C (``q k^T`` once, dq and dk summed in the kernel; not yet timed, so
        not the default).
    """

    features: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] | None = None
    conv_bias: bool = True
    use_bias: bool = False
    norm_eps: float = 1e-5
    n_layers: int = 1
    rescale_prenorm_residual: bool = True
    backend: str | None = None
    chunk_size: int = 64
    kernel_config: ChunkedConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.features)

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    def _check_config(self):
        for name in ("d_state", "d_conv", "head_dim", "n_groups", "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.d_inner < 1 or self.d_inner % self.head_dim:
            raise ValueError(
                f"head_dim must divide d_inner = expand * features = {self.d_inner}, got head_dim={self.head_dim}"
            )
        if self.num_heads % self.n_groups:
            raise ValueError(f"n_groups must divide the {self.num_heads} heads, got n_groups={self.n_groups}")
        lo, hi = _pair("A_init_range", self.A_init_range)
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {self.A_init_range!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_max must be >= dt_min > 0, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.dt_limit is not None:
            lo, hi = _pair("dt_limit", self.dt_limit)
            if not 0 <= lo < hi:
                raise ValueError(f"dt_limit must be None or (low, high) with 0 <= low < high, got {self.dt_limit!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")

    def initial_state(self, batch_size: int) -> Mamba2State:
        self._check_config()
        sdt = state_dtype(self.dtype)
        return Mamba2State(
            conv=jnp.zeros((batch_size, self.d_conv - 1, self.conv_dim), sdt),
            ssm=jnp.zeros((batch_size, self.num_heads, self.d_state, self.head_dim), sdt),
        )

    @nn.compact
    def __call__(self, u, state: Mamba2State | None = None, resets=None):
        self._check_config()
        batch, time, resets, state, _ = begin_call(self, u, self.features, state, resets)
        cdt = compute_dtype(self.dtype, u)
        f32 = jnp.promote_types(cdt, jnp.float32)  # dt, decays and norms: float32 (float64 in tests)
        E, N, P, H, G, d = self.d_inner, self.d_state, self.head_dim, self.num_heads, self.n_groups, self.features
        pdt = self.param_dtype

        def dense(features, fan_in, names, name, kernel_init=None):
            return nn.Dense(
                features, use_bias=self.use_bias, dtype=cdt, param_dtype=pdt,
                kernel_init=partitioned(kernel_init or fan_in_uniform(fan_in), names),
                bias_init=partitioned(nn.initializers.zeros, names[1:]), name=name,
            )

        zxbcdt = dense(E + self.conv_dim + H, d, ("embed", "mlp"), "in_proj")(u)
        z, xBC, dt = jnp.split(zxbcdt, [E, E + self.conv_dim], axis=-1)
        xBC, conv_state = CausalConv1d(
            features=self.conv_dim, width=self.d_conv, use_bias=self.conv_bias, axis_name="mlp",
            dtype=cdt, param_dtype=pdt, name="conv1d",
        )(xBC, ConvState(state.conv), resets)
        xBC = jax.nn.silu(xBC)
        x, B, C = jnp.split(xBC, [E, E + G * N], axis=-1)
        x = x.reshape(batch, time, H, P)
        # group j serves heads j * H/G ... (j + 1) * H/G - 1: the op's grouped q/k heads
        B = B.reshape(batch, time, G, N)
        C = C.reshape(batch, time, G, N)

        dt_init = dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor)
        dt_bias = self.param("dt_bias", partitioned(dt_init, ("heads",)), (H,), pdt)
        A_log = self.param("A_log", partitioned(A_log_init(*self.A_init_range), ("heads",)), (H,), pdt)
        D = self.param("D", partitioned(nn.initializers.ones, ("heads",)), (H,), pdt)
        dt = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))  # (batch, time, H)
        if self.dt_limit is not None:
            dt = jnp.clip(dt, self.dt_limit[0], self.dt_limit[1])
        A = -jnp.exp(A_log.astype(f32))
        g = dt * A  # log decay per head and step, <= 0
        v = (dt[..., None] * x.astype(f32)).astype(cdt)  # (batch, time, H, P)

        heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  (batch, time, H, .) <-> (batch, H, time, .)
        o, S = gated_linear_attention(
            heads_first(C), heads_first(B), heads_first(v), jnp.swapaxes(g, 1, 2), state=state.ssm, resets=resets,
            scale=1.0, chunk_size=self.chunk_size, backend=self.backend,
            config=self.kernel_config, sharding=self.kernel_sharding,
        )
        y = heads_first(o).astype(f32) + D.astype(f32)[:, None] * x.astype(f32)  # (batch, time, H, P)
        y = GatedGroupRMSNorm(groups=G, eps=self.norm_eps, dtype=cdt, param_dtype=pdt, name="norm")(y.reshape(batch, time, E), z)
        out_scale = 1.0 / math.sqrt(self.n_layers) if self.rescale_prenorm_residual else 1.0
        out = dense(d, E, ("mlp", "embed"), "out_proj", fan_in_uniform(E, out_scale))(y)
        sdt = state_dtype(self.dtype)
        return out, Mamba2State(conv=conv_state.inputs.astype(sdt), ssm=S.astype(sdt))


def _pair(name: str, value) -> tuple[float, float]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    return float(value[0]), float(value[1])


class Mamba2Block(MambaBlock):
    """``out = residual + mixer(RMSNorm(u))`` around the :class:`Mamba2Mixer` it holds:
    Mamba's pre-norm residual block (:class:`~mnemax.layers.mamba.MambaBlock`: ``norm_eps``,
    ``residual_in_fp32``, the norm in the mixer's dtype) with the Mamba-2 mixer; its state is
    the mixer's :class:`Mamba2State`."""

    mixer: Mamba2Mixer
