"""Gated DeltaNet: the gated delta rule mixer and its pre-norm block.

Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(ICLR 2025); the layer as in Qwen3-Next (HF ``transformers``' ``Qwen3NextGatedDeltaNet``)
and fla (``fla/layers/gated_deltanet.py``). With H_k key heads of width d_k (``num_heads``,
``head_dim``), H_v = r H_k value heads of width d_v = expand_v d_k (``num_v_heads``; value
head j reads key head j // r, i.e. q and k are repeated r times head by head), per token
x_t (d_model)::

    q_t = silu(conv_q(W_q x))_t                 (H_k, d_k)  depthwise causal conv, width conv_size
    k_t = silu(conv_k(W_k x))_t                 (H_k, d_k)
    v_t = silu(conv_v(W_v x))_t                 (H_v, d_v)
    q_t <- q_t / sqrt(|q_t|^2 + 1e-6),  k_t <- k_t / sqrt(|k_t|^2 + 1e-6)   per head, float32
    beta_t = sigmoid(W_b x_t)                   (H_v,)  in (0, 1); 2 sigmoid in (0, 2) with allow_neg_eigval
    g_t = -exp(A_log) softplus(W_a x_t + dt_bias)   (H_v,)  log decay; alpha_t = exp(g_t) in (0, 1)

    per value head (k_t, q_t of its key head):
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T          S: (d_k, d_v)
    o_t = S_t^T (q_t / sqrt(d_k))                                            (d_v,)

    y_t = W_o [ RMSNorm(o_t) * w * silu(W_g x_t) ]   per head over d_v (norm, then the scale
                                                      w (d_v,) shared by the heads, then the gate)

The recurrence is :func:`mnemax.kernels.delta_rule` with one log decay per head (the decay
acts before the delta update; ``backend`` and ``chunk_size`` are passed on). Without the
output gate (``use_gate=False``) the output is W_o RMSNorm(o_t) w.

Parameters (fla's names): ``q_proj``, ``k_proj`` (d_model, H_k, d_k); ``v_proj``, ``g_proj``
(d_model, H_v, d_v; g is the output gate); ``a_proj`` (the decay's input) and ``b_proj``
(beta's), (d_model, H_v); ``q_conv1d``, ``k_conv1d``, ``v_conv1d`` (conv_size, channels) over
the head-major flattened channels; ``A_log``, ``dt_bias`` (H_v,); ``o_norm`` scale (d_v,);
``o_proj`` (H_v, d_v, d_model).

Inits (fla's ``GatedDeltaNet`` model): projections N(0, initializer_range); A = exp(A_log)
~ U(A_init_range) (Qwen3-Next: U(0.01, 16); fla: U(0, 16)); dt_bias = softplus^-1(dt),
dt log-uniform in [dt_min, dt_max] floored at dt_init_floor (as Mamba); norm scale 1; the
convs PyTorch's default U(+-1/sqrt(conv_size)) (fla's layer; fla's model re-draws them
N(0, 0.02)).

State: the last conv_size - 1 inputs of each conv and the delta-rule state, float32::

    y, state = GatedDeltaNet(features=d)(x, state, resets)
    x, y: (batch, time, d)
    state: GatedDeltaNetState(conv_q=(batch, conv_size - 1, H_k d_k), conv_k=(same),
                              conv_v=(batch, conv_size - 1, H_v d_v), S=(batch, H_v, d_k, d_v))

A reset clears both (the convs see zeros across it, S restarts from zero).

The block (fla's ``GatedDeltaNetBlock``): ``h = x + Mixer(RMSNorm(x))``, then, unless the MLP
width is 0, ``out = h + MLP(RMSNorm(h))`` with a SwiGLU MLP of width ``intermediate_size``
(default fla's: 2/3 hidden_ratio d_model rounded up to a multiple of 256).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.kernels import delta_rule

from .base import Dtype, begin_call, check_sequence, compute_dtype, partitioned, state_dtype
from .conv import CausalConv1d, ConvState
from .mamba import dt_bias_init
from .mlp import ACTIVATIONS as MLP_KINDS
from .mlp import MLP
from .norms import RMSNorm, rms_norm

L2_EPS = 1e-6  # added to the sum of squares before the square root (Qwen3-Next, fla)


class GatedDeltaNetState(NamedTuple):
    conv_q: jax.Array  # (batch, conv_size - 1, H_k d_k): the last q-conv inputs
    conv_k: jax.Array  # (batch, conv_size - 1, H_k d_k)
    conv_v: jax.Array  # (batch, conv_size - 1, H_v d_v)
    S: jax.Array  # (batch, H_v, d_k, d_v): the delta-rule memory, o_t = S_t^T q_t


def l2_normalize(x, eps: float = L2_EPS):
    """``x / sqrt(sum(x^2) + eps)`` over the last axis, in float32 (float64 for float64 input)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def a_log_init(low: float, high: float):
    """log of A ~ U(low, high) (the decay rate per head)."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

    return init


class GatedRMSNorm(nn.Module):
    """``RMSNorm(o) * scale * silu(gate)`` over the last axis (the gate optional), in float32;
    the scale (features,) is shared by whatever leading axes ``o`` has (the heads)."""

    eps: float = 1e-6
    axis_name: str | None = "head_dim"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, o, gate=None):
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (o.shape[-1],), self.param_dtype)
        y = rms_norm(o, scale, self.eps)
        if gate is not None:
            y = y * jax.nn.silu(gate.astype(y.dtype))
        return y.astype(compute_dtype(self.dtype, o))


class GatedDeltaNet(nn.Module):
    """The Gated DeltaNet mixer (see the module docstring).

    Attributes:
      features: d_model.
      num_heads: H_k, the query/key heads.
      num_v_heads: H_v, the value heads (a multiple of num_heads; None: num_heads).
      head_dim: d_k; expand_v: d_v / d_k (d_v = head_dim * expand_v must be an integer).
      conv_size, conv_bias: the short convs' width and bias.
      use_gate: gate the output norm with silu(W_g x).
      allow_neg_eigval: beta = 2 sigmoid(.) in (0, 2) (negative eigenvalues of the transition).
      norm_eps: epsilon of the output RMSNorm.
      A_init_range: A = exp(A_log) ~ U(A_init_range) at init.
      dt_min, dt_max, dt_init_floor: the dt_bias init.
      initializer_range: standard deviation of the projections' normal init.
      backend, chunk_size: passed to :func:`mnemax.kernels.delta_rule`.
    """

    features: int
    num_heads: int = 6
    num_v_heads: int | None = None
    head_dim: int = 256
    expand_v: float = 2.0
    conv_size: int = 4
    conv_bias: bool = False
    use_gate: bool = True
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-6
    A_init_range: tuple[float, float] = (0.01, 16.0)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    initializer_range: float = 0.02
    backend: str | None = None
    chunk_size: int = 64
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def value_heads(self) -> int:
        return self.num_heads if self.num_v_heads is None else self.num_v_heads

    @property
    def head_v_dim(self) -> int:
        return int(round(self.head_dim * self.expand_v))

    def _check_config(self):
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        positive_int("features", self.features)
        positive_int("num_heads", self.num_heads)
        positive_int("num_v_heads", self.value_heads)
        positive_int("head_dim", self.head_dim)
        positive_int("conv_size", self.conv_size)
        positive_int("chunk_size", self.chunk_size)
        if self.value_heads % self.num_heads:
            raise ValueError(f"num_v_heads must be a multiple of num_heads ({self.num_heads}), got {self.num_v_heads!r}")
        dv = self.head_dim * self.expand_v
        if not (isinstance(self.expand_v, numbers.Real) and dv >= 1 and math.isclose(dv, round(dv), rel_tol=1e-6)):
            raise ValueError(
                f"expand_v must make head_dim * expand_v a positive integer (head_dim={self.head_dim}), got {self.expand_v!r}")
        lo_hi = self.A_init_range
        if not (isinstance(lo_hi, tuple | list) and len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1]):
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {lo_hi!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        for name in ("norm_eps", "dt_init_floor", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def initial_state(self, batch_size: int) -> GatedDeltaNetState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        key_dim, w = self.num_heads * self.head_dim, self.conv_size - 1
        return GatedDeltaNetState(
            conv_q=jnp.zeros((batch_size, w, key_dim), sdt),
            conv_k=jnp.zeros((batch_size, w, key_dim), sdt),
            conv_v=jnp.zeros((batch_size, w, self.value_heads * self.head_v_dim), sdt),
            S=jnp.zeros((batch_size, self.value_heads, self.head_dim, self.head_v_dim), sdt),
        )

    @nn.compact
    def __call__(self, x, state: GatedDeltaNetState | None = None, resets=None):
        self._check_config()
        batch, time, resets, state, _ = begin_call(self, x, self.features, state, resets)
        cdt = compute_dtype(self.dtype, x)
        f32 = jnp.promote_types(cdt, jnp.float32)
        pdt = self.param_dtype
        Hk, Hv, dk, dv = self.num_heads, self.value_heads, self.head_dim, self.head_v_dim
        init = nn.initializers.normal(self.initializer_range)

        def proj(features, names, name, axis=-1):
            return nn.DenseGeneral(
                features, axis=axis, use_bias=False, dtype=cdt, param_dtype=pdt,
                kernel_init=partitioned(init, names), name=name,
            )

        def short_conv(u, conv_state, name):  # u: (batch, time, heads, dim)
            flat = u.reshape(batch, time, -1)
            out, conv_state = CausalConv1d(
                features=flat.shape[-1], width=self.conv_size, use_bias=self.conv_bias, axis_name="heads",
                dtype=cdt, param_dtype=pdt, name=name,
            )(flat, ConvState(conv_state), resets)
            return jax.nn.silu(out).reshape(u.shape), conv_state.inputs

        q, conv_q = short_conv(proj((Hk, dk), ("embed", "heads", "head_dim"), "q_proj")(x), state.conv_q, "q_conv1d")
        k, conv_k = short_conv(proj((Hk, dk), ("embed", "heads", "head_dim"), "k_proj")(x), state.conv_k, "k_conv1d")
        v, conv_v = short_conv(proj((Hv, dv), ("embed", "heads", "head_dim"), "v_proj")(x), state.conv_v, "v_conv1d")
        b = proj(Hv, ("embed", "heads"), "b_proj")(x)
        a = proj(Hv, ("embed", "heads"), "a_proj")(x)
        A_log = self.param("A_log", partitioned(a_log_init(*self.A_init_range), ("heads",)), (Hv,), pdt)
        dt_bias = self.param(
            "dt_bias", partitioned(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), ("heads",)), (Hv,), pdt)

        q, k = l2_normalize(q).astype(cdt), l2_normalize(k).astype(cdt)
        if Hv != Hk:  # value head j reads key head j // r
            q, k = (jnp.repeat(u, Hv // Hk, axis=2) for u in (q, k))
        beta = jax.nn.sigmoid(b.astype(f32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        g = -jnp.exp(A_log.astype(f32)) * jax.nn.softplus(a.astype(f32) + dt_bias.astype(f32))

        heads_first = lambda u: jnp.moveaxis(u, 2, 1)  # noqa: E731 - (batch, time, heads, ...) -> (batch, heads, time, ...)
        o, S = delta_rule(
            heads_first(q), heads_first(k), heads_first(v), heads_first(beta), heads_first(g),
            state=state.S, resets=resets, scale=dk**-0.5, chunk_size=self.chunk_size, backend=self.backend,
        )
        o = jnp.moveaxis(o, 1, 2)  # (batch, time, H_v, d_v)
        gate = proj((Hv, dv), ("embed", "heads", "head_dim"), "g_proj")(x) if self.use_gate else None
        o = GatedRMSNorm(eps=self.norm_eps, dtype=cdt, param_dtype=pdt, name="o_norm")(o, gate)
        y = proj(self.features, ("heads", "head_dim", "embed"), "o_proj", axis=(-2, -1))(o)
        sdt = state_dtype(self.dtype)
        return y, GatedDeltaNetState(
            conv_q=conv_q.astype(sdt), conv_k=conv_k.astype(sdt), conv_v=conv_v.astype(sdt), S=S.astype(sdt))


def fla_mlp_width(d_model: int, hidden_ratio: float) -> int:
    """fla's ``GatedMLP`` width: int(2/3 hidden_ratio d_model) rounded up to a multiple of 256."""
    width = int(d_model * hidden_ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


class GatedDeltaNetBlock(nn.Module):
    """``h = x + mixer(RMSNorm(x))``; ``out = h + MLP(RMSNorm(h))`` (fla's GatedDeltaNet block).

    Attributes:
      mixer: the :class:`GatedDeltaNet` (unbound: built outside any module, or with
        ``parent=None``); its parameters are the block's ``mixer``, its state the block's.
        The norms and the MLP run in its dtype and param_dtype; the MLP's kernels are drawn
        N(0, mixer.initializer_range) as fla's.
      norm_eps: epsilon of the two RMSNorms (``attn_norm``, ``mlp_norm``).
      hidden_ratio, intermediate_size: the MLP width, ``intermediate_size`` or, when None,
        :func:`fla_mlp_width` (d_model, hidden_ratio); a width of 0 drops the MLP sub-block.
      mlp_kind: the MLP's kind (:class:`~mnemax.layers.mlp.MLP`; fla's is SwiGLU).
    """

    mixer: GatedDeltaNet
    norm_eps: float = 1e-6
    hidden_ratio: float = 4.0
    intermediate_size: int | None = None
    mlp_kind: str = "swiglu"

    @property
    def features(self) -> int:
        return self.mixer.features

    @property
    def mlp_width(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return fla_mlp_width(self.features, self.hidden_ratio)

    def _check_config(self):
        if self.intermediate_size is not None and (
            isinstance(self.intermediate_size, bool) or not isinstance(self.intermediate_size, numbers.Integral)
            or self.intermediate_size < 0
        ):
            raise ValueError(f"intermediate_size must be an integer >= 0 or None, got {self.intermediate_size!r}")
        if isinstance(self.hidden_ratio, bool) or not isinstance(self.hidden_ratio, numbers.Real) or self.hidden_ratio < 0:
            raise ValueError(f"hidden_ratio must be a number >= 0, got {self.hidden_ratio!r}")
        if self.mlp_kind not in MLP_KINDS:
            raise ValueError(f"mlp_kind must be one of {MLP_KINDS}, got {self.mlp_kind!r}")

    def initial_state(self, batch_size: int) -> GatedDeltaNetState:
        return self.mixer.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: GatedDeltaNetState | None = None, resets=None):
        check_sequence(x, self.features, name="x")
        self._check_config()
        m = self.mixer
        kw = dict(dtype=m.dtype, param_dtype=m.param_dtype)
        h, _ = RMSNorm(eps=self.norm_eps, name="attn_norm", **kw)(x)
        h, state = m(h, state, resets)
        x = x + h.astype(x.dtype)
        if self.mlp_width:
            h, _ = RMSNorm(eps=self.norm_eps, name="mlp_norm", **kw)(x)
            h, _ = MLP(hidden=self.mlp_width, kind=self.mlp_kind, kernel_init=nn.initializers.normal(m.initializer_range),
                       name="mlp", **kw)(h)
            x = x + h.astype(x.dtype)
        return x, state
