"""Linear attention with a decaying matrix memory: GLA, RetNet and Lightning attention, the
mixers and their pre-norm blocks.

All three are :func:`mnemax.kernels.gated_linear_attention` (``backend`` and ``chunk_size``
are passed on) with a different decay, feature map and output normalisation. Per batch row
and head, with a log decay g_t <= 0 and S: (d_k, d_v)::

    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T          o_t = S_t^T (scale q_t)

**Gated linear attention** (Yang, Wang, Shen, Panda & Kim, "Gated Linear Attention
Transformers with Hardware-Efficient Training", 2023; the layout of fla 0.6.0's
``fla/layers/gla.py``). H heads (``num_heads``), H_kv key/value heads (``num_kv_heads``;
each is read by H / H_kv query heads), d_k = d expand_k / H, d_v = d expand_v / H, per
token x_t (d)::

    q_t = W_q x_t                                   (H, d_k)
    k_t = W_k x_t,  v_t = W_v x_t                   (H_kv, d_k), (H_kv, d_v)
    g_t = logsigmoid(W_gk2 (W_gk1 x_t) + b_gk) / gate_logit_normalizer     (H_kv, d_k)
          (low rank gate_low_rank_dim; floored at clamp_min if set)
    per head (k, v, g of its key/value head), one log decay per key channel:
    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(d_k)                 (d_v,)
    y_t = W_o [ RMSNorm(o_t) * w * silu(W_g x_t) ]   per head over d_v (fla's fused_norm_gate,
                                                      w (d_v,) shared by the heads)

Without the output gate (``use_output_gate=False``) y_t = W_o [RMSNorm(o_t) w].

**Multi-scale retention** (Sun et al., "Retentive Network: A Successor to Transformer for
Large Language Models", 2023; fla's ``fla/layers/multiscale_retention.py``). As GLA without
the data-dependent gate: d_k = d expand_k / H, d_v = d expand_v / H, the rotary embedding
(rotate-half layout, base ``rope_base``, over the whole key head) on q and k at the token's
absolute position n in its sequence, and one fixed decay per head h = 0..H-1::

    q_t = RoPE(W_q x_t, n),  k_t = RoPE(W_k x_t, n),  v_t = W_v x_t
    g_h = log(1 - 2^(-5 - h))                        (gamma_h = 1 - 2^(-5-h), fla's retention ops)
    S_t = gamma_h S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(d_k)
    y_t = W_o [ RMSNorm(o_t) * w * silu(W_g x_t) ]   (fla's gated RMSNorm; the paper's GroupNorm
                                                      over heads with a swish gate)

**Lightning attention** (Qin et al., "TransNormerLLM: A Faster and Better Large Language
Model with Improved TransNormer", 2023, and "Lightning Attention-2", 2024: the linear
attention computed by the Lightning kernels). fla 0.6.0 ships the op
(``fla/ops/lightning_attn``: simple GLA with the decay below) but no layer; the layer is
TransNormerLLM's ``NormLinearAttention`` (its released HF code): H heads of d_h =
``head_dim`` (default d / H), per token::

    (q, k, v, u)_t = W_qkvu x_t                      4 x (H, d_h), one fused projection
    q_t <- silu(q_t),  k_t <- silu(k_t)
    g_h = -(8 h / H) (1 - l / L)                     h = 0..H-1 the head, l = layer_idx,
                                                     L = num_layers (fla's chunk_lightning_attn,
                                                     the TransNormerLLM paper's lambda = exp(g))
    S_t = exp(g_h) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t        (no scale, as TransNormerLLM)
    y_t = W_out [ u_t * SRMSNorm(o_t) ]              SRMSNorm(o) = o / sqrt(mean(o^2) + eps) over
                                                     all H d_h channels, no learned scale

(TransNormerLLM's released code draws its decay rates from ALiBi's slopes,
2^(-8 (h+1) / H) (1 - l / (L - 1) + 1e-5); this layer follows the paper and fla's op.) Head 0
does not decay (g = 0). The decay depends on the layer's depth, so the ``lightning``
family's blocks differ layer by layer (``scan_layers`` is refused).

Parameters (fla's names, PyTorch ``nn.Linear`` weights transposed and split by head):

======================= ============================= =======================================
mnemax                  shape                         fla / TransNormerLLM
======================= ============================= =======================================
q_proj/kernel           (d, H, d_k)                   q_proj.weight (H d_k, d)
k_proj/kernel           (d, H_kv, d_k)                k_proj.weight
v_proj/kernel           (d, H_kv, d_v)                v_proj.weight
g_proj/kernel           (d, H, d_v)                   g_proj.weight (the output gate)
gk_proj_0/kernel        (d, r)                        gk_proj.0.weight (GLA; r = gate_low_rank_dim)
gk_proj_1/kernel, bias  (r, H_kv, d_k), (H_kv, d_k)   gk_proj.1.weight, gk_proj.1.bias (GLA)
g_norm_swish_gate/scale (d_v,)                        g_norm_swish_gate.weight (g_norm.weight
                                                      without the output gate)
o_proj/kernel           (H, d_v, d)                   o_proj.weight
qkvu_proj/kernel        (d, 4, H, d_h)                qkvu_proj.weight (Lightning, chunk(4) order)
out_proj/kernel         (H, d_h, d)                   out_proj.weight (Lightning)
======================= ============================= =======================================

Inits (fla's ``_init_weights``): every projection N(0, initializer_range), biases 0, norm
scales 1.

State, float32::

    y, state = GatedLinearAttention(features=d)(x, state, resets)
    x, y: (batch, time, d)
    GatedLinearAttentionState(S=(batch, H, d_k, d_v))          conv_q/k/v None; with use_short_conv
                                                               the convs' last conv_size - 1 inputs
    MultiScaleRetentionState(S=(batch, H, d_k, d_v), pos=(batch,) int32)  pos: the next token's
                                                                         position in its sequence
    LightningAttentionState(S=(batch, H, d_h, d_h))

A reset clears S (and starts RetNet's positions at 0), so a sequence started at a reset
sees exactly what a fresh call sees. fla's layers keep S transposed in their cache
(``state_v_first``: (batch, H, d_v, d_k)) for GLA.

GLA's ``use_short_conv`` (fla's option, off by default as there): depthwise causal convs of
width ``conv_size`` on q, k and v after their projections, each followed by SiLU (fla's
``ShortConvolution(activation='silu')``; the delta-rule layers' :func:`~.delta_net.short_conv`,
parameters ``q_conv1d``, ``k_conv1d``, ``v_conv1d`` (conv_size, channels)); a reset clears their
taps too. Not carried over from fla: feature maps, gates other than swish,
``elementwise_affine=False`` (fla's defaults are used).

The blocks (fla's ``GLABlock``, ``RetNetBlock``): ``h = x + Mixer(RMSNorm(x))``, then, unless
the MLP width is 0, ``out = h + MLP(RMSNorm(h))`` with a SwiGLU MLP of width
``intermediate_size`` (default fla's: 2/3 hidden_ratio d rounded up to a multiple of 256;
hidden_ratio 4 for GLA, 2 for RetNet). Lightning attention's block is the same (TransNormerLLM's
own block uses SRMSNorm and an unactivated GLU).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnemax.kernels import gated_linear_attention
from mnemax.kernels.chunked_gpu import ChunkedConfig
from mnemax.kernels.sharding import KernelSharding

from .attention import episode_positions, rope
from .base import Dtype, begin_call, compute_dtype, partitioned, state_dtype
from .delta_net import GatedDeltaNetBlock, GatedRMSNorm, check_positive_int, heads_first, short_conv
from .norms import rms_norm


class GatedLinearAttentionState(NamedTuple):
    S: jax.Array  # (batch, H, d_k, d_v): o_t = S_t^T q_t
    conv_q: jax.Array | None = None  # (batch, conv_size - 1, H d_k): with use_short_conv, the last q-conv inputs
    conv_k: jax.Array | None = None  # (batch, conv_size - 1, H_kv d_k)
    conv_v: jax.Array | None = None  # (batch, conv_size - 1, H_kv d_v)


class MultiScaleRetentionState(NamedTuple):
    S: jax.Array  # (batch, H, d_k, d_v)
    pos: jax.Array  # (batch,) int32: the position of the next token in its sequence (rotary)


class LightningAttentionState(NamedTuple):
    S: jax.Array  # (batch, H, d_h, d_h)


def _positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _expanded_width(name, features, ratio, num_heads) -> int:
    """round(features * ratio), which must be an integer divisible by num_heads."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"{name} must be a number, got {ratio!r}")
    width = features * ratio
    if width < num_heads or not math.isclose(width, round(width), rel_tol=1e-6) or round(width) % num_heads:
        raise ValueError(f"{name} must make features * {name} an integer divisible by num_heads "
                         f"(features={features}, num_heads={num_heads}), got {ratio!r}")
    return int(round(width))


class _DecayedLinearAttention(nn.Module):
    """What the GLA and RetNet mixers share: sizes and their checks, the projections, the
    call of the op and the gated per-head RMSNorm before W_o (see the module docstring)."""

    features: int
    num_heads: int = 4
    num_kv_heads: int | None = None
    expand_k: float = 0.5
    expand_v: float = 1.0
    use_output_gate: bool = True
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    backend: str | None = None
    chunk_size: int = 64
    kernel_config: ChunkedConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_k_dim(self) -> int:
        return _expanded_width("expand_k", self.features, self.expand_k, self.num_heads) // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return _expanded_width("expand_v", self.features, self.expand_v, self.num_heads) // self.num_heads

    def _check_config(self):
        check_positive_int("features", self.features)
        check_positive_int("num_heads", self.num_heads)
        check_positive_int("num_kv_heads", self.kv_heads)
        check_positive_int("chunk_size", self.chunk_size)
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads ({self.num_heads}), got {self.num_kv_heads!r}")
        _expanded_width("expand_k", self.features, self.expand_k, self.num_heads)
        _expanded_width("expand_v", self.features, self.expand_v, self.num_heads)
        _positive_number("norm_eps", self.norm_eps)
        _positive_number("initializer_range", self.initializer_range)

    def _proj(self, features, names, name, cdt, axis=-1, use_bias=False):
        return nn.DenseGeneral(
            features, axis=axis, use_bias=use_bias, dtype=cdt, param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.normal(self.initializer_range), names),
            bias_init=partitioned(nn.initializers.zeros, names[1:]), name=name,
        )

    def _qkv(self, x, cdt):
        """q (batch, time, H, d_k); k (batch, time, H_kv, d_k); v (batch, time, H_kv, d_v)."""
        H, Hkv, dk, dv = self.num_heads, self.kv_heads, self.head_k_dim, self.head_v_dim
        names = ("embed", "heads", "head_dim")
        return (self._proj((H, dk), names, "q_proj", cdt)(x), self._proj((Hkv, dk), names, "k_proj", cdt)(x),
                self._proj((Hkv, dv), names, "v_proj", cdt)(x))

    def _attend(self, q, k, v, g, state_S, resets, scale):
        """The op; q: (batch, time, H, d_k), k, v: (batch, time, H_kv, .), repeated to the H
        query heads here, as is g when it is per key channel (batch, time, H_kv, d_k); a per-head
        g comes as (batch, H, time). Returns o (batch, time, H, d_v) and S."""
        groups = self.num_heads // self.kv_heads
        if g.ndim == 4:
            g = heads_first(jnp.repeat(g, groups, axis=2) if groups > 1 else g)
        if groups > 1:  # key/value head j serves query heads j * groups .. (j + 1) * groups - 1
            k, v = (jnp.repeat(u, groups, axis=2) for u in (k, v))
        o, S = gated_linear_attention(
            heads_first(q), heads_first(k), heads_first(v), g,
            state=state_S, resets=resets, scale=scale, chunk_size=self.chunk_size, backend=self.backend,
            config=self.kernel_config, sharding=self.kernel_sharding,
        )
        return jnp.moveaxis(o, 1, 2), S

    def _output(self, x, o, cdt):
        """W_o [RMSNorm(o) w silu(W_g x)] (the gate optional); o: (batch, time, H, d_v)."""
        H, dv = self.num_heads, self.head_v_dim
        pdt = self.param_dtype
        if self.use_output_gate:
            gate = self._proj((H, dv), ("embed", "heads", "head_dim"), "g_proj", cdt)(x)
            o = GatedRMSNorm(eps=self.norm_eps, dtype=cdt, param_dtype=pdt, name="g_norm_swish_gate")(o, gate)
        else:
            o = GatedRMSNorm(eps=self.norm_eps, dtype=cdt, param_dtype=pdt, name="g_norm")(o)
        return self._proj(self.features, ("heads", "head_dim", "embed"), "o_proj", cdt, axis=(-2, -1))(o)


class GatedLinearAttention(_DecayedLinearAttention):
    """The GLA mixer (fla's ``GatedLinearAttention``; see the module docstring).

    Attributes:
      features: d_model.
      num_heads: H; num_kv_heads: H_kv (a divisor of H; None: H).
      expand_k, expand_v: d_k = features expand_k / H, d_v = features expand_v / H.
      use_output_gate: gate the output norm with silu(W_g x).
      gate_low_rank_dim: the rank r of the decay's projection W_gk2 W_gk1.
      gate_logit_normalizer: divides logsigmoid(.) (fla: 16).
      clamp_min: if set (<= 0), the log decays are floored at it.
      use_short_conv, conv_size, conv_bias: fla's short convs (width conv_size, SiLU) on q, k
        and v (off by default, as in fla).
      norm_eps: epsilon of the output RMSNorm.
      initializer_range: standard deviation of the projections' normal init.
      backend, chunk_size: passed to :func:`mnemax.kernels.gated_linear_attention`.
      kernel_config, kernel_sharding: passed to it as ``config`` (the Pallas GPU kernels'
        :class:`~mnemax.kernels.chunked_gpu.ChunkedConfig`) and ``sharding`` (the mesh axes
        splitting batch and heads; set by ``mnemax.build(..., kernel_sharding=)``).
    """

    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    clamp_min: float | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    conv_bias: bool = False

    def _check_config(self):
        super()._check_config()
        check_positive_int("gate_low_rank_dim", self.gate_low_rank_dim)
        if not isinstance(self.use_short_conv, bool):
            raise TypeError(f"use_short_conv must be a bool, got {self.use_short_conv!r}")
        check_positive_int("conv_size", self.conv_size)
        _positive_number("gate_logit_normalizer", self.gate_logit_normalizer)
        if self.clamp_min is not None and (
                isinstance(self.clamp_min, bool) or not isinstance(self.clamp_min, numbers.Real) or self.clamp_min > 0):
            raise ValueError(f"clamp_min must be None or a number <= 0 (a log decay), got {self.clamp_min!r}")

    def initial_state(self, batch_size: int) -> GatedLinearAttentionState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        S = jnp.zeros((batch_size, self.num_heads, self.head_k_dim, self.head_v_dim), sdt)
        if not self.use_short_conv:
            return GatedLinearAttentionState(S=S)
        w, Hkv = self.conv_size - 1, self.kv_heads
        return GatedLinearAttentionState(
            S=S, conv_q=jnp.zeros((batch_size, w, self.num_heads * self.head_k_dim), sdt),
            conv_k=jnp.zeros((batch_size, w, Hkv * self.head_k_dim), sdt),
            conv_v=jnp.zeros((batch_size, w, Hkv * self.head_v_dim), sdt))

    @nn.compact
    def __call__(self, x, state: GatedLinearAttentionState | None = None, resets=None):
        self._check_config()
        batch, time, resets, state, _ = begin_call(self, x, self.features, state, resets)
        cdt = compute_dtype(self.dtype, x)
        f32 = jnp.promote_types(cdt, jnp.float32)
        Hkv, dk = self.kv_heads, self.head_k_dim
        q, k, v = self._qkv(x, cdt)
        convs = {}
        if self.use_short_conv:  # fla's ShortConvolution(activation='silu') on each projection
            def conv(u, name):
                return short_conv(u, getattr(state, f"conv_{name}"), resets, width=self.conv_size,
                                  use_bias=self.conv_bias, silu=True, dtype=cdt, param_dtype=self.param_dtype,
                                  name=f"{name}_conv1d")

            (q, cq), (k, ck), (v, cv) = conv(q, "q"), conv(k, "k"), conv(v, "v")
            sdt = state_dtype(self.dtype)
            convs = {"conv_q": cq.astype(sdt), "conv_k": ck.astype(sdt), "conv_v": cv.astype(sdt)}
        gk = self._proj(self.gate_low_rank_dim, ("embed", None), "gk_proj_0", cdt)(x)
        gk = self._proj((Hkv, dk), (None, "heads", "head_dim"), "gk_proj_1", cdt, use_bias=True)(gk)
        g = jax.nn.log_sigmoid(gk.astype(f32)) / self.gate_logit_normalizer  # (batch, time, H_kv, d_k)
        if self.clamp_min is not None:
            g = jnp.maximum(g, self.clamp_min)
        o, S = self._attend(q, k, v, g, state.S, resets, dk**-0.5)
        y = self._output(x, o, cdt)
        return y, GatedLinearAttentionState(S=S.astype(state_dtype(self.dtype)), **convs)


def retention_log_decay(num_heads: int) -> np.ndarray:
    """RetNet's fixed per-head log decays, log(1 - 2^(-5 - h)) for h = 0..H-1 (float64)."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float64))))


def lightning_log_decay(num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
    """Lightning attention's fixed per-head log decays, -(8 h / H) (1 - l / L) for h = 0..H-1
    (fla's ``chunk_lightning_attn``; the TransNormerLLM paper), float64."""
    return -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * np.arange(num_heads, dtype=np.float64)


class MultiScaleRetention(_DecayedLinearAttention):
    """The RetNet mixer (fla's ``MultiScaleRetention``; see the module docstring).

    Attributes:
      features: d_model.
      num_heads: H; num_kv_heads: H_kv (a divisor of H; None: H).
      expand_k, expand_v: d_k = features expand_k / H (even: the rotary embedding rotates
        pairs), d_v = features expand_v / H.
      use_output_gate: gate the output norm with silu(W_g x).
      rope_base: the rotary embedding's base.
      norm_eps: epsilon of the output RMSNorm.
      initializer_range: standard deviation of the projections' normal init.
      backend, chunk_size: passed to :func:`mnemax.kernels.gated_linear_attention`.
      kernel_config, kernel_sharding: passed to it as ``config`` (the Pallas GPU kernels'
        :class:`~mnemax.kernels.chunked_gpu.ChunkedConfig`) and ``sharding`` (the mesh axes
        splitting batch and heads; set by ``mnemax.build(..., kernel_sharding=)``).
    """

    num_heads: int = 8
    expand_k: float = 1.0
    expand_v: float = 2.0
    rope_base: float = 10000.0

    def _check_config(self):
        super()._check_config()
        if self.head_k_dim % 2:
            raise ValueError(f"expand_k must make the key head width features * expand_k / num_heads even for the "
                             f"rotary embedding (got {self.head_k_dim}), got {self.expand_k!r}")
        _positive_number("rope_base", self.rope_base)

    def initial_state(self, batch_size: int) -> MultiScaleRetentionState:
        self._check_config()
        return MultiScaleRetentionState(
            S=jnp.zeros((batch_size, self.num_heads, self.head_k_dim, self.head_v_dim), state_dtype(self.dtype)),
            pos=jnp.zeros((batch_size,), jnp.int32),
        )

    @nn.compact
    def __call__(self, x, state: MultiScaleRetentionState | None = None, resets=None):
        self._check_config()
        batch, time, resets, state, _ = begin_call(self, x, self.features, state, resets)
        cdt = compute_dtype(self.dtype, x)
        q, k, v = self._qkv(x, cdt)
        _, positions = episode_positions(state.pos, resets, batch, time)  # restart at 0 after a reset
        q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        f32 = jnp.promote_types(cdt, jnp.float32)
        g = jnp.broadcast_to(jnp.asarray(retention_log_decay(self.num_heads), f32)[None, :, None],
                             (batch, self.num_heads, time))
        o, S = self._attend(q, k, v, g, state.S, resets, self.head_k_dim**-0.5)
        y = self._output(x, o, cdt)
        return y, MultiScaleRetentionState(S=S.astype(state_dtype(self.dtype)), pos=positions[:, -1] + 1)


class LightningAttention(nn.Module):
    """The Lightning attention mixer (TransNormerLLM's ``NormLinearAttention`` with fla's
    ``chunk_lightning_attn`` decay; see the module docstring).

    Attributes:
      features: d_model.
      num_heads: H; head_dim: d_h (None: features / H).
      layer_idx, num_layers: the layer's depth l and the model's L, which set the decays.
      norm_eps: epsilon of the SRMSNorm.
      initializer_range: standard deviation of the projections' normal init.
      backend, chunk_size: passed to :func:`mnemax.kernels.gated_linear_attention`.
      kernel_config, kernel_sharding: passed to it as ``config`` (the Pallas GPU kernels'
        :class:`~mnemax.kernels.chunked_gpu.ChunkedConfig`) and ``sharding`` (the mesh axes
        splitting batch and heads; set by ``mnemax.build(..., kernel_sharding=)``).
    """

    features: int
    num_heads: int = 8
    head_dim: int | None = None
    layer_idx: int = 0
    num_layers: int = 1
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    backend: str | None = None
    chunk_size: int = 64
    kernel_config: ChunkedConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def head_width(self) -> int:
        return self.features // self.num_heads if self.head_dim is None else self.head_dim

    def _check_config(self):
        check_positive_int("features", self.features)
        check_positive_int("num_heads", self.num_heads)
        check_positive_int("chunk_size", self.chunk_size)
        check_positive_int("num_layers", self.num_layers)
        if self.head_dim is None:
            if self.features % self.num_heads:
                raise ValueError(f"num_heads must divide features ({self.features}) when head_dim is None, "
                                 f"got {self.num_heads!r}")
        else:
            check_positive_int("head_dim", self.head_dim)
        if (isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, numbers.Integral)
                or not 0 <= self.layer_idx < self.num_layers):
            raise ValueError(f"layer_idx must be an integer in [0, num_layers={self.num_layers}), got {self.layer_idx!r}")
        _positive_number("norm_eps", self.norm_eps)
        _positive_number("initializer_range", self.initializer_range)

    def initial_state(self, batch_size: int) -> LightningAttentionState:
        self._check_config()
        d = self.head_width
        return LightningAttentionState(S=jnp.zeros((batch_size, self.num_heads, d, d), state_dtype(self.dtype)))

    @nn.compact
    def __call__(self, x, state: LightningAttentionState | None = None, resets=None):
        self._check_config()
        batch, time, resets, state, _ = begin_call(self, x, self.features, state, resets)
        cdt = compute_dtype(self.dtype, x)
        f32 = jnp.promote_types(cdt, jnp.float32)
        H, d = self.num_heads, self.head_width
        init = nn.initializers.normal(self.initializer_range)
        qkvu = nn.DenseGeneral(
            (4, H, d), use_bias=False, dtype=cdt, param_dtype=self.param_dtype,
            kernel_init=partitioned(init, ("embed", None, "heads", "head_dim")), name="qkvu_proj",
        )(x)
        q, k, v, u = (qkvu[:, :, i] for i in range(4))  # (batch, time, H, d_h) each
        q, k = jax.nn.silu(q), jax.nn.silu(k)
        g = jnp.asarray(lightning_log_decay(H, self.layer_idx, self.num_layers), f32)
        o, S = gated_linear_attention(
            heads_first(q), heads_first(k), heads_first(v), jnp.broadcast_to(g[None, :, None], (batch, H, time)),
            state=state.S, resets=resets, scale=1.0, chunk_size=self.chunk_size, backend=self.backend,
            config=self.kernel_config, sharding=self.kernel_sharding,
        )
        o = rms_norm(jnp.moveaxis(o, 1, 2).reshape(batch, time, H * d), None, self.norm_eps)  # SRMSNorm
        o = (u.reshape(batch, time, H * d).astype(o.dtype) * o).astype(cdt).reshape(batch, time, H, d)
        y = nn.DenseGeneral(
            self.features, axis=(-2, -1), use_bias=False, dtype=cdt, param_dtype=self.param_dtype,
            kernel_init=partitioned(init, ("heads", "head_dim", "embed")), name="out_proj",
        )(o)
        return y, LightningAttentionState(S=S.astype(state_dtype(self.dtype)))


class LinearAttentionBlock(GatedDeltaNetBlock):
    """``h = x + mixer(RMSNorm(x))``; ``out = h + MLP(RMSNorm(h))`` (fla's ``GLABlock`` /
    ``RetNetBlock``) for any of this module's mixers: :class:`~mnemax.layers.delta_net.GatedDeltaNetBlock`'s
    pre-norm layout and fields (``mixer``, ``norm_eps``, ``hidden_ratio``,
    ``intermediate_size``, ``mlp_kind``) with any mixer."""

    mixer: nn.Module


class GatedLinearAttentionBlock(LinearAttentionBlock):
    """fla's ``GLABlock``: :class:`LinearAttentionBlock` around a :class:`GatedLinearAttention`
    (MLP hidden_ratio 4)."""

    mixer: GatedLinearAttention


class MultiScaleRetentionBlock(LinearAttentionBlock):
    """fla's ``RetNetBlock``: :class:`LinearAttentionBlock` around a :class:`MultiScaleRetention`
    (MLP hidden_ratio 2, fla's ``RetNetConfig``)."""

    mixer: MultiScaleRetention
    hidden_ratio: float = 2.0


class LightningAttentionBlock(LinearAttentionBlock):
    """:class:`LinearAttentionBlock` around a :class:`LightningAttention` (MLP hidden_ratio 4)."""

    mixer: LightningAttention
