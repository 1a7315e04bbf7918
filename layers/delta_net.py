"""The delta-rule mixers Gated DeltaNet and DeltaNet, their pre-norm blocks, and the pieces
the delta-rule layers share (short convs, L2 / sum normalisation, the gated output RMSNorm;
Kimi Delta Attention, the per-channel-decay member, is :mod:`mnemax.layers.kimi_delta`).

Gated DeltaNet
--------------

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

DeltaNet
--------

Yang, Wang, Zhang, Shen & Kim, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (NeurIPS 2024; the rule is Schlag, Irie & Schmidhuber 2021's); the layer as
fla 0.6.0's ``fla/layers/delta_net.py``. With H heads (``num_heads``), d_k = expand_k d_model
/ H and d_v = expand_v d_model / H, per token x_t (d_model)::

    q_t = phi(conv_q(W_q x))_t,  k_t = phi(conv_k(W_k x))_t     (H, d_k)
    v_t = silu(conv_v(W_v x))_t                                  (H, d_v)
        phi = silu | relu | elu + 1 | identity (qk_activation); the depthwise causal convs of
        width conv_size are left out with use_short_conv=False
    q_t, k_t <- x / sqrt(|x|^2 + 1e-6)   (qk_norm "l2", float32)
             or x / max(|x|_1, 1e-6)      (qk_norm "sum")         per head
    beta_t = sigmoid(W_b x_t)  (H,);  1 without use_beta; doubled with allow_neg_eigval

    per head:  S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (q_t / sqrt(d_k))

    y_t = W_o [ RMSNorm(o_t) * w ]                      per head over d_v (fla's default)
    y_t = W_o [ RMSNorm(o_t) * w * silu(W_g x_t) ]      with use_gate

The recurrence is :func:`mnemax.kernels.delta_rule` with ``g=None``. fla 0.6.0 always applies
the output norm (its model config's ``use_output_norm`` reaches the layer as an ignored
keyword), so there is no switch for it here. Parameters (fla's names): ``q_proj``, ``k_proj``
(d_model, H, d_k); ``v_proj``, ``g_proj`` (d_model, H, d_v); ``b_proj`` (d_model, H);
``q_conv1d``, ``k_conv1d``, ``v_conv1d`` (conv_size, channels); ``o_norm`` scale (d_v,);
``o_proj`` (H, d_v, d_model). Inits as the GDN's: projections N(0, initializer_range), norm
scale 1, convs PyTorch's default. State: :class:`DeltaNetState`, the same fields as
:class:`GatedDeltaNetState` (the conv tails are (batch, 0, channels) without the convs).
The block :class:`DeltaNetBlock` is fla's ``DeltaNetBlock``: the GDN block around a DeltaNet.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.kernels import delta_rule
from mnemax.kernels.chunked_gpu import ChunkedConfig
from mnemax.kernels.sharding import KernelSharding

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


GATE_ACTIVATIONS = ("silu", "sigmoid")  # GatedRMSNorm's gate: fla's FusedRMSNormGated "swish" / "sigmoid"


class GatedRMSNorm(nn.Module):
    """``RMSNorm(o) * scale * act(gate)`` over the last axis (the gate optional), in float32;
    the scale (features,) is shared by whatever leading axes ``o`` has (the heads).
    ``activation``: ``"silu"`` (GDN, DeltaNet) or ``"sigmoid"`` (KDA)."""

    eps: float = 1e-6
    axis_name: str | None = "head_dim"
    activation: str = "silu"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, o, gate=None):
        if self.activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {GATE_ACTIVATIONS}, got {self.activation!r}")
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (o.shape[-1],), self.param_dtype)
        y = rms_norm(o, scale, self.eps)
        if gate is not None:
            act = jax.nn.silu if self.activation == "silu" else jax.nn.sigmoid
            y = y * act(gate.astype(y.dtype))
        return y.astype(compute_dtype(self.dtype, o))


def sum_normalize(x, eps: float = L2_EPS):
    """``x / max(sum |x|, eps)`` over the last axis, in float32 (fla's ``qk_norm="sum"``:
    ``F.normalize(x, p=1, eps=1e-6)``)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x / jnp.maximum(jnp.sum(jnp.abs(x), axis=-1, keepdims=True), eps)


def check_positive_int(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive(module, *names: str) -> None:
    """ValueError naming the first of ``names`` (fields of ``module``) that is not > 0."""
    for name in names:
        value = getattr(module, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def head_dense(features, names, name: str, *, dtype, param_dtype, std: float, axis=-1, use_bias: bool = False):
    """A bias-free (by default) ``nn.DenseGeneral`` with a N(0, std) kernel carrying the
    logical axis ``names`` (inputs then outputs; a bias takes the output names, zeros).
    Build it inside a compact method (it binds to the module being run)."""
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=partitioned(nn.initializers.normal(std), names),
        bias_init=partitioned(nn.initializers.zeros, names[-n_out:]), name=name,
    )


def short_conv(u, conv_state, resets, *, width: int, use_bias: bool, silu: bool, dtype, param_dtype, name: str):
    """The delta-rule layers' short conv: a depthwise causal conv (:class:`CausalConv1d`
    named ``name``, kernel (width, channels)) over the head-major flattened channels of ``u``
    (batch, time, heads, dim), then SiLU if ``silu``. ``conv_state``: its last width - 1
    inputs (batch, width - 1, heads dim). Returns (out like ``u``, the new conv inputs).
    Call it inside a compact method."""
    batch, time = u.shape[:2]
    flat = u.reshape(batch, time, -1)
    out, conv_state = CausalConv1d(
        features=flat.shape[-1], width=width, use_bias=use_bias, axis_name="heads",
        dtype=dtype, param_dtype=param_dtype, name=name,
    )(flat, ConvState(conv_state), resets)
    if silu:
        out = jax.nn.silu(out)
    return out.reshape(u.shape), conv_state.inputs


def heads_first(u):
    """(batch, time, heads, ...) -> (batch, heads, time, ...), the delta_rule op's layout."""
    return jnp.moveaxis(u, 2, 1)


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
      kernel_config, kernel_sharding: passed to it as ``config`` (the Pallas GPU kernels'
        :class:`~mnemax.kernels.chunked_gpu.ChunkedConfig`) and ``sharding`` (the mesh axes
        splitting batch and heads; set by ``mnemax.build(..., kernel_sharding=)``).
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
    kernel_config: ChunkedConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def value_heads(self) -> int:
        return self.num_heads if self.num_v_heads is None else self.num_v_heads

    @property
    def head_v_dim(self) -> int:
        return int(round(self.head_dim * self.expand_v))

    def _check_config(self):
        for name in ("features", "num_heads", "head_dim", "conv_size", "chunk_size"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("num_v_heads", self.value_heads)
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
        check_positive(self, "norm_eps", "dt_init_floor", "initializer_range")

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
        _, _, resets, state, _ = begin_call(self, x, self.features, state, resets)
        cdt = compute_dtype(self.dtype, x)
        f32 = jnp.promote_types(cdt, jnp.float32)
        pdt = self.param_dtype
        Hk, Hv, dk, dv = self.num_heads, self.value_heads, self.head_dim, self.head_v_dim

        def proj(features, names, name, axis=-1):
            return head_dense(features, names, name, dtype=cdt, param_dtype=pdt, std=self.initializer_range, axis=axis)

        def conv(u, conv_state, name):  # u: (batch, time, heads, dim)
            return short_conv(u, conv_state, resets, width=self.conv_size, use_bias=self.conv_bias, silu=True,
                              dtype=cdt, param_dtype=pdt, name=name)

        q, conv_q = conv(proj((Hk, dk), ("embed", "heads", "head_dim"), "q_proj")(x), state.conv_q, "q_conv1d")
        k, conv_k = conv(proj((Hk, dk), ("embed", "heads", "head_dim"), "k_proj")(x), state.conv_k, "k_conv1d")
        v, conv_v = conv(proj((Hv, dv), ("embed", "heads", "head_dim"), "v_proj")(x), state.conv_v, "v_conv1d")
        b = proj(Hv, ("embed", "heads"), "b_proj")(x)
        a = proj(Hv, ("embed", "heads"), "a_proj")(x)
        A_log = self.param("A_log", partitioned(a_log_init(*self.A_init_range), ("heads",)), (Hv,), pdt)
        dt_bias = self.param(
            "dt_bias", partitioned(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), ("heads",)), (Hv,), pdt)

        # H_k grouped q/k heads: value head j reads key head j // r (the op's grouped heads;
        # the GPU kernels for a decay per head read each group in place, the other forms repeat)
        q, k = l2_normalize(q).astype(cdt), l2_normalize(k).astype(cdt)
        beta = jax.nn.sigmoid(b.astype(f32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        g = -jnp.exp(A_log.astype(f32)) * jax.nn.softplus(a.astype(f32) + dt_bias.astype(f32))

        o, S = delta_rule(
            heads_first(q), heads_first(k), heads_first(v), heads_first(beta), heads_first(g),
            state=state.S, resets=resets, scale=dk**-0.5, chunk_size=self.chunk_size, backend=self.backend,
            config=self.kernel_config, sharding=self.kernel_sharding,
        )
        o = jnp.moveaxis(o, 1, 2)  # (batch, time, H_v, d_v)
        gate = proj((Hv, dv), ("embed", "heads", "head_dim"), "g_proj")(x) if self.use_gate else None
        o = GatedRMSNorm(eps=self.norm_eps, dtype=cdt, param_dtype=pdt, name="o_norm")(o, gate)
        y = proj(self.features, ("heads", "head_dim", "embed"), "o_proj", axis=(-2, -1))(o)
        sdt = state_dtype(self.dtype)
        return y, GatedDeltaNetState(
            conv_q=conv_q.astype(sdt), conv_k=conv_k.astype(sdt), conv_v=conv_v.astype(sdt), S=S.astype(sdt))


class DeltaNetState(NamedTuple):
    conv_q: jax.Array  # (batch, conv_size - 1, H d_k): the last q-conv inputs ((batch, 0, H d_k) without convs)
    conv_k: jax.Array  # (batch, conv_size - 1, H d_k)
    conv_v: jax.Array  # (batch, conv_size - 1, H d_v)
    S: jax.Array  # (batch, H, d_k, d_v): the delta-rule memory, o_t = S_t^T q_t


QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")  # DeltaNet's phi on q and k ("elu" is elu + 1)
QK_NORMS = ("l2", "sum")


def _qk_activation(u, kind: str):
    if kind == "silu":
        return jax.nn.silu(u)
    if kind == "relu":
        return jax.nn.relu(u)
    if kind == "elu":  # fla's elu_p1
        return jax.nn.elu(u) + 1.0
    return u


class DeltaNet(nn.Module):
    """The DeltaNet mixer (see the module docstring; defaults are fla 0.6.0's layer's, except
    ``norm_eps``, fla's model-config value that its blocks pass to the layer).

    Attributes:
      features: d_model.
      num_heads: H.
      expand_k, expand_v: the key and value widths H d_k = expand_k d_model, H d_v =
        expand_v d_model (integers divisible by H).
      use_beta: beta = sigmoid(W_b x); else 1.
      use_gate: gate the output norm with silu(W_g x).
      use_short_conv, conv_size, conv_bias: the short convs on q, k, v.
      allow_neg_eigval: beta doubled, in (0, 2).
      qk_activation: phi on q and k, one of :data:`QK_ACTIVATIONS` ("elu" is elu + 1).
      qk_norm: "l2" or "sum" normalisation of q and k per head.
      norm_eps: epsilon of the output RMSNorm.
      initializer_range: standard deviation of the projections' normal init.
      backend, chunk_size: passed to :func:`mnemax.kernels.delta_rule`.
      kernel_config, kernel_sharding: passed to it as ``config`` (the Pallas GPU kernels'
        :class:`~mnemax.kernels.chunked_gpu.ChunkedConfig`) and ``sharding`` (the mesh axes
        splitting batch and heads; set by ``mnemax.build(..., kernel_sharding=)``).
    """

    features: int
    num_heads: int = 4
    expand_k: float = 1.0
    expand_v: float = 1.0
    use_beta: bool = True
    use_gate: bool = False
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    allow_neg_eigval: bool = False
    qk_activation: str = "silu"
    qk_norm: str = "l2"
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    backend: str | None = None
    chunk_size: int = 64
    kernel_config: ChunkedConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def key_dim(self) -> int:
        return int(round(self.features * self.expand_k))

    @property
    def value_dim(self) -> int:
        return int(round(self.features * self.expand_v))

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def conv_width(self) -> int:
        """The conv tails' length: conv_size - 1, 0 without the convs."""
        return self.conv_size - 1 if self.use_short_conv else 0

    def _check_config(self):
        for name in ("features", "num_heads", "conv_size", "chunk_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("expand_k", "expand_v"):
            ratio = getattr(self, name)
            dim = self.features * ratio if isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) else None
            if dim is None or dim < self.num_heads or not math.isclose(dim, round(dim), rel_tol=1e-6) \
                    or round(dim) % self.num_heads:
                raise ValueError(f"{name} must make features * {name} an integer divisible by num_heads "
                                 f"(features={self.features}, num_heads={self.num_heads}), got {ratio!r}")
        if self.qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"qk_activation must be one of {QK_ACTIVATIONS}, got {self.qk_activation!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        check_positive(self, "norm_eps", "initializer_range")

    def initial_state(self, batch_size: int) -> DeltaNetState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        w = self.conv_width
        return DeltaNetState(
            conv_q=jnp.zeros((batch_size, w, self.key_dim), sdt),
            conv_k=jnp.zeros((batch_size, w, self.key_dim), sdt),
            conv_v=jnp.zeros((batch_size, w, self.value_dim), sdt),
            S=jnp.zeros((batch_size, self.num_heads, self.head_k_dim, self.head_v_dim), sdt),
        )

    @nn.compact
    def __call__(self, x, state: DeltaNetState | None = None, resets=None):
        self._check_config()
        _, _, resets, state, _ = begin_call(self, x, self.features, state, resets)
        cdt = compute_dtype(self.dtype, x)
        f32 = jnp.promote_types(cdt, jnp.float32)
        pdt = self.param_dtype
        H, dk, dv = self.num_heads, self.head_k_dim, self.head_v_dim

        def proj(features, names, name, axis=-1):
            return head_dense(features, names, name, dtype=cdt, param_dtype=pdt, std=self.initializer_range, axis=axis)

        def conv(u, conv_state, name, silu):  # u: (batch, time, heads, dim)
            if not self.use_short_conv:
                return (jax.nn.silu(u) if silu else u), conv_state
            return short_conv(u, conv_state, resets, width=self.conv_size, use_bias=self.conv_bias, silu=silu,
                              dtype=cdt, param_dtype=pdt, name=name)

        qk_silu = self.qk_activation == "silu"
        q, conv_q = conv(proj((H, dk), ("embed", "heads", "head_dim"), "q_proj")(x), state.conv_q, "q_conv1d", qk_silu)
        k, conv_k = conv(proj((H, dk), ("embed", "heads", "head_dim"), "k_proj")(x), state.conv_k, "k_conv1d", qk_silu)
        v, conv_v = conv(proj((H, dv), ("embed", "heads", "head_dim"), "v_proj")(x), state.conv_v, "v_conv1d", True)
        if not qk_silu:
            q, k = _qk_activation(q, self.qk_activation), _qk_activation(k, self.qk_activation)
        normalize = l2_normalize if self.qk_norm == "l2" else sum_normalize
        q, k = normalize(q).astype(cdt), normalize(k).astype(cdt)
        if self.use_beta:
            beta = jax.nn.sigmoid(proj(H, ("embed", "heads"), "b_proj")(x).astype(f32))
        else:
            beta = jnp.ones(x.shape[:2] + (H,), f32)
        if self.allow_neg_eigval:
            beta = 2.0 * beta

        o, S = delta_rule(
            heads_first(q), heads_first(k), heads_first(v), heads_first(beta), None,
            state=state.S, resets=resets, scale=dk**-0.5, chunk_size=self.chunk_size, backend=self.backend,
            config=self.kernel_config, sharding=self.kernel_sharding,
        )
        o = jnp.moveaxis(o, 1, 2)  # (batch, time, H, d_v)
        gate = proj((H, dv), ("embed", "heads", "head_dim"), "g_proj")(x) if self.use_gate else None
        o = GatedRMSNorm(eps=self.norm_eps, dtype=cdt, param_dtype=pdt, name="o_norm")(o, gate)
        y = proj(self.features, ("heads", "head_dim", "embed"), "o_proj", axis=(-2, -1))(o)
        sdt = state_dtype(self.dtype)
        return y, DeltaNetState(
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
        check_positive(self, "norm_eps")

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


class DeltaNetBlock(GatedDeltaNetBlock):
    """fla's ``DeltaNetBlock``: :class:`GatedDeltaNetBlock`'s pre-norm layout (RMSNorm, mixer,
    RMSNorm, SwiGLU MLP; the same fields) around a :class:`DeltaNet` mixer."""

    mixer: DeltaNet
