"""xLSTM layers: the sLSTM and mLSTM layers of the NeurIPS paper and the mLSTM layer of
xLSTM 7B, each on the layer contract. The residual blocks and the stack are in
:mod:`mnemax.layers.xlstm`; the recurrences are the kernels
:func:`mnemax.kernels.mlstm` and :func:`mnemax.kernels.slstm` (equations there).

Papers: Beck et al., "xLSTM: Extended Long Short-Term Memory" (NeurIPS 2024);
Beck et al., "xLSTM 7B: A Recurrent LLM for Fast and Efficient Inference" (2025).
Layouts follow the PyPI ``xlstm`` 2.0.6 package exactly (checked by the converter
fixtures in tests/fixtures):

``MLSTMLayer`` (NeurIPS mLSTM layer, "pre up-projection")::

    (x_m, z) = split(W_up x)                           inner = up_proj_dim(d, proj_factor, round_to,
                                                                   round_mode): ceil(proj_factor d / 64) 64
                                                                   by default
    x_c = SiLU(causal_conv4(x_m))                      depthwise, with bias
    q = Q x_c, k = K x_c, v = V x_m                    block-diagonal, inner // qkv_blocksize blocks
    (i~, f~) = W_{i,f} [q; k; v] + b_{i,f}             one scalar per head
    h = mLSTM(q, k, v, i~, f~)                          num_heads heads of inner / num_heads
    y = W_down ((headwise_layernorm(h) + skip * x_c) * SiLU(z))

  Init (upstream): W_up, Q, K, V ~ N(0, 2 / (5 d)); W_down ~ N(0, (2 / (num_blocks sqrt d))^2);
  W_i = W_f = 0, b_f = linspace(3, 6) over heads, b_i ~ N(0, 0.1^2); skip = 1.

``SLSTMLayer`` (NeurIPS sLSTM layer; the block adds the post up-projection FFN)::

    x_c = SiLU(causal_conv4(x))
    i~ = W_i x_c, f~ = W_f x_c, z~ = W_z x, o~ = W_o x  block-diagonal per head (no bias)
    h = sLSTM(i~, f~, z~, o~; R, b)                     recurrent R block-diagonal per head
    y = headwise_layernorm(h)                           (no output projection)

  Upstream stores the i/f gate projections under swapped names: its module ``fgate``
  computes the input gate and ``igate`` the forget gate; the converter maps them.
  Init: gate kernels ~ N(0, 2 / (5 d)); R = 0; b_f "powerlaw_blockdependent":
  -(-5 + 12 (u / (head_dim - 1))^(0.3 + 1.3 block_index / (num_blocks - 1))), u = 0..head_dim-1;
  other biases 0.

``MLSTMLargeLayer`` (xLSTM 7B mLSTM layer)::

    q = W_q x, k = W_k x  (qk_dim = int(d qk_dim_factor), 0.5: half the value width)
    v = W_v x, o~ = W_o x  (v_dim = int(d v_dim_factor))
    i~ = cap(W_i x + b_i), f~ = cap(W_f x + b_f),  cap(u) = c tanh(u / c), c = gate_soft_cap (15)
    h = mLSTM(q, k, v, i~, f~)
    y = W_out (sigmoid(o~) * headwise_layernorm(h))

  Init (xlstm-jax, the 7B training code): W_q, W_k, W_v ~ N(0, 2 / (5 d)); W_o = 0;
  W_i = W_f = 0, b_i = -10, b_f = linspace(3, 6) over heads; W_out wang.

Every rounded width is computed by :mod:`mnemax.layers.xlstm_widths`, as upstream does.

Headwise layer norms normalise each head's features (eps 1e-5 NeurIPS, ``norm_eps``
7B) with a learned per-feature scale and no bias (upstream's NeurIPS norms store the
scale as ``1 + weight``; mnemax stores the scale itself).

The mLSTM kernel scales queries by ``d_qk ** -0.5`` (NeurIPS code scales keys; same
outputs) and uses eps 1e-6. Parameters carry the logical axes 'embed' (model width),
'mlp' (inner / projected width) and 'heads'.

States: ``MLSTMLayerState(conv, cell)`` with ``ConvState`` (or ``()`` without a conv)
and :class:`~mnemax.kernels.MLSTMState`; ``SLSTMLayerState(conv, cell)`` with
:class:`~mnemax.kernels.SLSTMState`; the 7B layer's state is the ``MLSTMState`` alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.kernels import MLSTMConfig, MLSTMState, SLSTMConfig, SLSTMState, mlstm, slstm
from mnemax.kernels.mlstm import initial_state as mlstm_initial_state
from mnemax.kernels.sharding import KernelSharding
from mnemax.kernels.slstm import initial_state as slstm_initial_state

from .base import (
    Dtype,
    Stateless,
    check_resets,
    check_sequence,
    check_state,
    compute_dtype,
    expected_state,
    partitioned,
    state_dtype,
)
from .conv import CausalConv1d, ConvState
from .norms import layer_norm
from .xlstm_widths import ROUND_MODES, large_qk_v_dims, qkv_proj_blocks, up_proj_dim

FFN_ACTIVATIONS = {
    "gelu": lambda u: jax.nn.gelu(u, approximate=False),  # torch's default (erf) GeLU
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "relu^2": lambda u: jnp.square(jax.nn.relu(u)),
    "sigmoid": jax.nn.sigmoid,
    "selu": jax.nn.selu,
}


class MLSTMLayerState(NamedTuple):
    conv: ConvState | tuple
    cell: MLSTMState


class SLSTMLayerState(NamedTuple):
    conv: ConvState | tuple
    cell: SLSTMState


# ----------------------------------------------------------------------------- helpers


def small_init(dim: int):
    """N(0, 2 / (5 dim)) ("Transformers without Tears", as upstream)."""
    return nn.initializers.normal(math.sqrt(2.0 / (5.0 * dim)))


def wang_init(dim: int, num_blocks: int):
    """N(0, (2 / (num_blocks sqrt(dim)))^2) for output projections (as upstream)."""
    return nn.initializers.normal(2.0 / max(num_blocks, 1) / math.sqrt(dim))


def linspace_init(start: float, end: float):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.linspace(start, end, shape[-1], dtype=dtype).reshape(shape)

    return init


def symmetric_uniform(bound: float):
    """U(-bound, bound)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def soft_cap(x, cap: float | None):
    """``cap * tanh(x / cap)``; identity for ``cap=None``."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def headwise_norm(h, scale, eps: float):
    """Layer norm of each head's features (no bias). h: (..., heads, head_dim) ->
    (..., heads * head_dim), float32; scale: (heads * head_dim,)."""
    y = layer_norm(h, None, None, eps)
    return y.reshape(h.shape[:-2] + (-1,)) * scale.astype(y.dtype)


def _begin_call(module, x, state, resets):
    """Validates a layer call; returns (resets, state (the fresh one for None), compute dtype)."""
    module._check_config()
    check_sequence(x, module.features)
    batch, time, _ = x.shape
    resets = check_resets(resets, batch, time)
    if state is None:
        state = module.initial_state(batch)
    else:
        check_state(state, expected_state(module, batch))
    return resets, state, compute_dtype(module.dtype, x)


def _conv_state(features: int, width: int, dtype, batch: int):
    if width == 0:
        return ()
    return CausalConv1d(features=features, width=width, dtype=dtype, parent=None).initial_state(batch)


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: ``y[..., b, :] = x[..., b, :] @ kernel[b]`` over ``num_blocks``
    equal blocks (upstream ``LinearHeadwiseExpand`` with expand factor 1, no bias)."""

    num_blocks: int
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        if features % self.num_blocks:
            raise ValueError(f"features ({features}) must be divisible by num_blocks ({self.num_blocks})")
        size = features // self.num_blocks
        kernel = self.param(
            "kernel",
            partitioned(self.kernel_init, ("mlp", None, None)),
            (self.num_blocks, size, size),
            self.param_dtype,
        )
        dt = compute_dtype(self.dtype, x)
        xb = x.astype(dt).reshape(x.shape[:-1] + (self.num_blocks, size))
        return jnp.einsum("...bi,bio->...bo", xb, kernel.astype(dt)).reshape(x.shape)


class GatedFFN(Stateless):
    """Upstream's gated feed-forward: ``W_down (act(g) * u)`` with ``(g, u) = split(W_up x)``.
    ``act`` is one of ``FFN_ACTIVATIONS`` ("gelu" is the exact erf GeLU)."""

    hidden: int
    act: str = "gelu"
    num_blocks: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, state=None, resets=None):
        self._check_call(x, state, resets)
        if self.act not in FFN_ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(FFN_ACTIVATIONS)}, got {self.act!r}")
        d = x.shape[-1]
        dt = compute_dtype(self.dtype, x)
        kw = dict(use_bias=False, dtype=dt, param_dtype=self.param_dtype)
        up = nn.Dense(2 * self.hidden, kernel_init=partitioned(small_init(d), ("embed", "mlp")), name="proj_up", **kw)(x)
        gate, val = jnp.split(up, 2, axis=-1)
        h = FFN_ACTIVATIONS[self.act](gate) * val
        y = nn.Dense(d, kernel_init=partitioned(wang_init(d, self.num_blocks), ("mlp", "embed")), name="proj_down", **kw)(h)
        return y, ()


def _gate(features, bias_init, name, dtype, param_dtype, in_axis="embed"):
    """A per-head gate pre-activation (float32 at least), zero-initialised kernel."""
    return nn.Dense(
        features,
        use_bias=True,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(nn.initializers.zeros, (in_axis, None)),
        bias_init=partitioned(bias_init, (None,)),
        name=name,
    )


def _to_heads(x, heads):
    """(B, T, heads * d) -> (B, heads, T, d)."""
    return jnp.swapaxes(x.reshape(x.shape[:2] + (heads, -1)), 1, 2)


# ----------------------------------------------------------------------------- mLSTM (NeurIPS)


class MLSTMLayer(nn.Module):
    """NeurIPS mLSTM layer (see module docstring). x: (batch, time, features)."""

    features: int
    num_heads: int = 4
    proj_factor: float = 2.0
    round_to: int = 64
    round_mode: str = "up"
    conv_width: int = 4
    qkv_blocksize: int = 4
    num_blocks: int = 1
    chunk_size: int = 64
    eps: float = 1e-6
    norm_eps: float = 1e-5
    backend: str | None = None
    kernel_config: MLSTMConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def inner(self) -> int:
        """The up-projected width (upstream ``_inner_embedding_dim``)."""
        return up_proj_dim(self.features, self.proj_factor, self.round_to, self.round_mode)

    @property
    def qkv_blocks(self) -> int:
        """Blocks of the block-diagonal q/k/v projections (``inner // qkv_blocksize``)."""
        return qkv_proj_blocks(self.inner, self.qkv_blocksize)

    def _check_config(self):
        if self.round_mode not in ROUND_MODES:
            raise ValueError(f"round_mode must be one of {ROUND_MODES}, got {self.round_mode!r}")
        inner = self.inner
        if inner <= 0:
            raise ValueError(
                f"the inner width (proj_factor {self.proj_factor} x features {self.features}, rounded {self.round_mode} "
                f"to a multiple of round_to {self.round_to}) must be positive, got {inner}"
            )
        if self.num_heads <= 0 or inner % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide the inner width {inner}")
        blocks = self.qkv_blocks
        if blocks <= 0 or inner % blocks:
            raise ValueError(
                f"qkv_blocksize ({self.qkv_blocksize}) must split the inner width {inner} into equal blocks "
                f"(inner // qkv_blocksize = {blocks} blocks)"
            )
        if self.conv_width < 0:
            raise ValueError(f"conv_width must be >= 0, got {self.conv_width}")

    def initial_state(self, batch_size: int) -> MLSTMLayerState:
        self._check_config()
        dh = self.inner // self.num_heads
        sdt = state_dtype(self.dtype)
        return MLSTMLayerState(
            _conv_state(self.inner, self.conv_width, self.dtype, batch_size),
            mlstm_initial_state(batch_size, self.num_heads, dh, dh, sdt),
        )

    @nn.compact
    def __call__(self, x, state: MLSTMLayerState | None = None, resets=None):
        resets, state, dt = _begin_call(self, x, state, resets)
        d = x.shape[-1]
        gate_dt = jnp.promote_types(dt, jnp.float32)
        inner, heads = self.inner, self.num_heads
        kw = dict(use_bias=False, dtype=dt, param_dtype=self.param_dtype)

        up = nn.Dense(2 * inner, kernel_init=partitioned(small_init(d), ("embed", "mlp")), name="proj_up", **kw)(x)
        x_m, z = jnp.split(up, 2, axis=-1)
        conv_state = ()
        x_c = x_m
        if self.conv_width:
            conv = CausalConv1d(inner, self.conv_width, axis_name="mlp", dtype=dt, param_dtype=self.param_dtype, name="conv")
            x_c, conv_state = conv(x_m, state.conv, resets)
        x_c = jax.nn.silu(x_c)
        proj = dict(num_blocks=self.qkv_blocks, kernel_init=small_init(d), dtype=dt, param_dtype=self.param_dtype)
        q = HeadwiseLinear(name="q_proj", **proj)(x_c)
        k = HeadwiseLinear(name="k_proj", **proj)(x_c)
        v = HeadwiseLinear(name="v_proj", **proj)(x_m)
        gate_in = jnp.concatenate([q, k, v], axis=-1)
        i = _gate(heads, nn.initializers.normal(0.1), "igate", gate_dt, self.param_dtype, "mlp")(gate_in)
        f = _gate(heads, linspace_init(3.0, 6.0), "fgate", gate_dt, self.param_dtype, "mlp")(gate_in)
        h, cell = mlstm(
            _to_heads(q, heads), _to_heads(k, heads), _to_heads(v, heads),
            jnp.swapaxes(i, 1, 2), jnp.swapaxes(f, 1, 2),
            state=state.cell, resets=resets, chunk_size=self.chunk_size, eps=self.eps, backend=self.backend,
            config=self.kernel_config, sharding=self.kernel_sharding,
        )
        scale = self.param("outnorm", partitioned(nn.initializers.ones, ("mlp",)), (inner,), self.param_dtype)
        skip = self.param("learnable_skip", partitioned(nn.initializers.ones, ("mlp",)), (inner,), self.param_dtype)
        h = headwise_norm(jnp.swapaxes(h, 1, 2), scale, self.norm_eps).astype(dt)
        h = (h + skip.astype(dt) * x_c) * jax.nn.silu(z)
        y = nn.Dense(d, kernel_init=partitioned(wang_init(d, self.num_blocks), ("mlp", "embed")), name="proj_down", **kw)(h)
        return y, MLSTMLayerState(conv_state, cell)


# ----------------------------------------------------------------------------- sLSTM (NeurIPS)


SLSTM_BIAS_INITS = ("powerlaw_blockdependent", "small_init", "standard", "zeros")


def powerlaw_forget_bias(head_dim: int, block_index: int, num_blocks: int):
    """Upstream's "powerlaw_blockdependent" forget-gate bias for one head, (head_dim,)."""
    ratio = block_index / (num_blocks - 1) if num_blocks > 1 else 0.0
    u = jnp.arange(head_dim, dtype=jnp.float32) / max(head_dim - 1, 1)
    return -(-5.0 + 12.0 * u ** (0.3 + 1.3 * ratio))


class SLSTMLayer(nn.Module):
    """NeurIPS sLSTM layer (see module docstring). x: (batch, time, features)."""

    features: int
    num_heads: int = 4
    conv_width: int = 4
    num_blocks: int = 1
    block_index: int = 0
    bias_init: str = "powerlaw_blockdependent"
    recurrent_init: str = "zeros"
    norm_eps: float = 1e-5
    backend: str | None = None
    kernel_config: SLSTMConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _check_config(self):
        if self.num_heads < 1 or self.features % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be >= 1 and divide features ({self.features})")
        if self.conv_width < 0:
            raise ValueError(f"conv_width must be >= 0, got {self.conv_width}")
        if self.bias_init not in SLSTM_BIAS_INITS:
            raise ValueError(f"bias_init must be one of {SLSTM_BIAS_INITS}, got {self.bias_init!r}")
        if self.recurrent_init not in ("zeros", "standard"):
            raise ValueError(f"recurrent_init must be 'zeros' or 'standard', got {self.recurrent_init!r}")

    def initial_state(self, batch_size: int) -> SLSTMLayerState:
        self._check_config()
        dh = self.features // self.num_heads
        return SLSTMLayerState(
            _conv_state(self.features, self.conv_width, self.dtype, batch_size),
            slstm_initial_state(batch_size, self.num_heads, dh, state_dtype(self.dtype)),
        )

    def _bias_init(self, key, shape, dtype=jnp.float32):
        _, heads, dh = shape
        if self.bias_init == "standard":  # every gate's bias U(-1/sqrt(d), 1/sqrt(d))
            return symmetric_uniform(1 / math.sqrt(heads * dh))(key, shape, dtype)
        b = jnp.zeros(shape, dtype)
        if self.bias_init == "powerlaw_blockdependent":
            fb = powerlaw_forget_bias(dh, self.block_index, self.num_blocks)
        elif self.bias_init == "small_init":
            fb = jnp.linspace(3.0, 6.0, dh)
        else:
            return b
        return b.at[1].set(jnp.broadcast_to(fb.astype(dtype), (heads, dh)))

    @nn.compact
    def __call__(self, x, state: SLSTMLayerState | None = None, resets=None):
        resets, state, dt = _begin_call(self, x, state, resets)
        batch, time, d = x.shape
        heads, dh = self.num_heads, d // self.num_heads
        conv_state = ()
        x_c = x.astype(dt)
        if self.conv_width:
            conv = CausalConv1d(d, self.conv_width, dtype=dt, param_dtype=self.param_dtype, name="conv")
            x_c, conv_state = conv(x, state.conv, resets)
            x_c = jax.nn.silu(x_c)
        w = self.param(
            "gate_kernel", partitioned(small_init(d), (None, "heads", None, None)), (4, heads, dh, dh), self.param_dtype
        ).astype(dt)
        xh = x.astype(dt).reshape(batch, time, heads, dh)
        xch = x_c.reshape(batch, time, heads, dh)
        pre = jnp.stack(
            [jnp.einsum("bthd,hdo->btho", src, w[g]) for g, src in enumerate((xch, xch, xh, xh))], axis=2
        )  # (B, T, 4, H, dh): gates i, f from the conv branch, z, o from x
        r_init = nn.initializers.zeros if self.recurrent_init == "zeros" else symmetric_uniform(1 / math.sqrt(d))
        R = self.param("recurrent_kernel", partitioned(r_init, ("heads", None, None, None)), (heads, dh, 4, dh), self.param_dtype)
        b = self.param("bias", partitioned(self._bias_init, (None, "heads", None)), (4, heads, dh), self.param_dtype)
        h, cell = slstm(pre, R, b, state=state.cell, resets=resets, backend=self.backend, config=self.kernel_config,
                        sharding=self.kernel_sharding)
        scale = self.param("group_norm", partitioned(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
        return headwise_norm(h, scale, self.norm_eps).astype(dt), SLSTMLayerState(conv_state, cell)


# ----------------------------------------------------------------------------- mLSTM (xLSTM 7B)


class MLSTMLargeLayer(nn.Module):
    """xLSTM 7B mLSTM layer (see module docstring). x: (batch, time, features)."""

    features: int
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    gate_soft_cap: float | None = 15.0
    num_blocks: int = 1
    chunk_size: int = 64
    eps: float = 1e-6
    norm_eps: float = 1e-6
    backend: str | None = None
    kernel_config: MLSTMConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def dims(self) -> tuple[int, int]:
        """(qk_dim, v_dim) as upstream computes them: int(features * factor)."""
        return large_qk_v_dims(self.features, self.qk_dim_factor, self.v_dim_factor)

    def _check_config(self):
        qk, v = self.dims
        if self.num_heads <= 0 or qk % self.num_heads or v % self.num_heads or qk < self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide qk_dim ({qk}) and v_dim ({v})")

    def initial_state(self, batch_size: int) -> MLSTMState:
        self._check_config()
        qk, v = self.dims
        h = self.num_heads
        return mlstm_initial_state(batch_size, h, qk // h, v // h, state_dtype(self.dtype))

    @nn.compact
    def __call__(self, x, state: MLSTMState | None = None, resets=None):
        resets, state, dt = _begin_call(self, x, state, resets)
        d = x.shape[-1]
        gate_dt = jnp.promote_types(dt, jnp.float32)
        heads = self.num_heads
        qk_dim, v_dim = self.dims
        kw = dict(use_bias=False, dtype=dt, param_dtype=self.param_dtype)

        def dense(n, name, init):
            return nn.Dense(n, kernel_init=partitioned(init, ("embed", "mlp")), name=name, **kw)(x)

        q = dense(qk_dim, "q", small_init(d))
        k = dense(qk_dim, "k", small_init(d))
        v = dense(v_dim, "v", small_init(d))
        o = dense(v_dim, "ogate_preact", nn.initializers.zeros)
        i = soft_cap(_gate(heads, nn.initializers.constant(-10.0), "igate_preact", gate_dt, self.param_dtype)(x), self.gate_soft_cap)
        f = soft_cap(_gate(heads, linspace_init(3.0, 6.0), "fgate_preact", gate_dt, self.param_dtype)(x), self.gate_soft_cap)
        h, new_state = mlstm(
            _to_heads(q, heads), _to_heads(k, heads), _to_heads(v, heads),
            jnp.swapaxes(i, 1, 2), jnp.swapaxes(f, 1, 2),
            state=state, resets=resets, chunk_size=self.chunk_size, eps=self.eps, backend=self.backend,
            config=self.kernel_config, sharding=self.kernel_sharding,
        )
        scale = self.param("multihead_norm", partitioned(nn.initializers.ones, ("mlp",)), (v_dim,), self.param_dtype)
        h = headwise_norm(jnp.swapaxes(h, 1, 2), scale, self.norm_eps).astype(dt)
        h = jax.nn.sigmoid(o) * h
        y = nn.Dense(d, kernel_init=partitioned(wang_init(d, self.num_blocks), ("mlp", "embed")), name="out_proj", **kw)(h)
        return y, new_state
