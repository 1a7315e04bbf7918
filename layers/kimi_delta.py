"""Kimi Delta Attention (KDA): the delta rule with a decay per key channel, and its block.

Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture" (2025); the layer as
fla 0.6.0's ``fla/layers/kda.py`` (``KimiDeltaAttention``). Gated DeltaNet
(:mod:`mnemax.layers.delta_net`) with its one decay per head made one per key channel, a
low-rank decay and output-gate projection, and a sigmoid output gate. With H_k key heads of
width d_k (``num_heads``, ``head_dim``), H_v = r H_k value heads of width d_v = expand_v d_k
(``num_v_heads``; value head j reads key head j // r) and the low rank d_v, per token x_t
(d_model)::

    q_t = silu(conv_q(W_q x))_t                 (H_k, d_k)  depthwise causal conv, width conv_size
    k_t = silu(conv_k(W_k x))_t                 (H_k, d_k)  (no convs: silu(W x) with use_short_conv=False)
    v_t = silu(conv_v(W_v x))_t                 (H_v, d_v)
    q_t <- q_t / sqrt(|q_t|^2 + 1e-6),  k_t <- k_t / sqrt(|k_t|^2 + 1e-6)   per head, float32
    beta_t = sigmoid(W_b x_t)                   (H_v,)  in (0, 1); 2 sigmoid in (0, 2) with allow_neg_eigval
    g_t = -exp(A_log) softplus(W_fb W_fa x_t + dt_bias)   (H_v, d_k)  log decay per channel
        (A_log (H_v,) broadcast over d_k, dt_bias (H_v, d_k); fla's ``naive_kda_gate``)

    per value head (k_t, q_t of its key head):
    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T       S: (d_k, d_v)
    o_t = S_t^T (q_t / sqrt(d_k))                                                (d_v,)

    y_t = W_o [ RMSNorm(o_t) * w * sigmoid(W_gb W_ga x_t + b_g) ]   per head over d_v

The recurrence is :func:`mnemax.kernels.delta_rule` with g per key channel (the decay acts
before the delta update, as in fla's ``naive_recurrent_kda``; ``backend`` and
``chunk_size`` are passed on). fla's ``lower_bound`` / ``safe_gate`` variant of the gate
(``lower_bound * sigmoid(exp(A_log) (.))``) is not offered.

Parameters (fla's ``f_proj`` / ``g_proj`` two-layer projections are named as in Kimi Linear's
HF code): ``q_proj``, ``k_proj`` (d_model, H_k, d_k); ``v_proj`` (d_model, H_v, d_v);
``q_conv1d``, ``k_conv1d``, ``v_conv1d`` (conv_size, channels) over the head-major flattened
channels; ``f_a_proj`` (d_model, d_v) and ``f_b_proj`` (d_v, H_v, d_k): fla's ``f_proj.0``,
``f_proj.1``; ``b_proj`` (d_model, H_v); ``A_log`` (H_v,); ``dt_bias`` (H_v, d_k) (fla's is
flat, H_v d_k); ``g_a_proj`` (d_model, d_v) and ``g_b_proj`` (d_v, H_v, d_v) with a bias
(H_v, d_v): fla's ``g_proj.0``, ``g_proj.1``; ``o_norm`` scale (d_v,); ``o_proj``
(H_v, d_v, d_model).

Inits (fla's ``KDAForCausalLM``): projections N(0, initializer_range), the gate bias 0;
A = exp(A_log) ~ U(A_init_range) = U(1, 16); dt_bias = softplus^-1(dt), dt log-uniform in
[dt_min, dt_max] floored at dt_init_floor, per channel; norm scale 1; the convs PyTorch's
default U(+-1/sqrt(conv_size)) (fla's layer; its model re-draws them N(0, 0.02)).

State: the last conv_size - 1 inputs of each conv and the delta-rule state, float32::

    y, state = KimiDeltaAttention(features=d)(x, state, resets)
    x, y: (batch, time, d)
    state: KimiDeltaAttentionState(conv_q=(batch, conv_size - 1, H_k d_k), conv_k=(same),
                                   conv_v=(batch, conv_size - 1, H_v d_v), S=(batch, H_v, d_k, d_v))

(the conv tails are (batch, 0, channels) without the convs). A reset clears both. fla's
layer keeps its recurrent state value-first, (d_v, d_k) per head; mnemax's is (d_k, d_v).

The block :class:`KimiDeltaAttentionBlock` is fla's ``KDABlock``: ``h = x + Mixer(RMSNorm(x))``,
then ``out = h + SwiGLU(RMSNorm(h))`` (:class:`~mnemax.layers.delta_net.GatedDeltaNetBlock`'s
layout and fields).
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

from .base import Dtype, begin_call, compute_dtype, partitioned, state_dtype
from .delta_net import (
    GatedDeltaNetBlock,
    GatedRMSNorm,
    a_log_init,
    check_positive,
    check_positive_int,
    head_dense,
    heads_first,
    l2_normalize,
    short_conv,
)
from .mamba import dt_bias_init


class KimiDeltaAttentionState(NamedTuple):
    conv_q: jax.Array  # (batch, conv_size - 1, H_k d_k): the last q-conv inputs ((batch, 0, .) without convs)
    conv_k: jax.Array  # (batch, conv_size - 1, H_k d_k)
    conv_v: jax.Array  # (batch, conv_size - 1, H_v d_v)
    S: jax.Array  # (batch, H_v, d_k, d_v): the delta-rule memory, o_t = S_t^T q_t


class KimiDeltaAttention(nn.Module):
    """The KDA mixer (see the module docstring; defaults are fla 0.6.0's layer's, except
    ``norm_eps``, fla's model-config value that its blocks pass to the layer).

    Attributes:
      features: d_model.
      num_heads: H_k, the query/key heads.
      num_v_heads: H_v, the value heads (a multiple of num_heads; None: num_heads).
      head_dim: d_k; expand_v: d_v / d_k (d_v = head_dim * expand_v must be an integer; d_v
        is also the rank of the decay and gate projections).
      use_short_conv, conv_size, conv_bias: the short convs on q, k, v.
      allow_neg_eigval: beta = 2 sigmoid(.) in (0, 2).
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
    num_heads: int = 16
    num_v_heads: int | None = None
    head_dim: int = 128
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-6
    A_init_range: tuple[float, float] = (1.0, 16.0)
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

    @property
    def conv_width(self) -> int:
        """The conv tails' length: conv_size - 1, 0 without the convs."""
        return self.conv_size - 1 if self.use_short_conv else 0

    def _check_config(self):
        for name in ("features", "num_heads", "head_dim", "conv_size", "chunk_size"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("num_v_heads", self.value_heads)
        if self.value_heads % self.num_heads:
            raise ValueError(f"num_v_heads must be a multiple of num_heads ({self.num_heads}), got {self.num_v_heads!r}")
        ok = isinstance(self.expand_v, numbers.Real) and not isinstance(self.expand_v, bool)
        dv = self.head_dim * self.expand_v if ok else 0
        if not (dv >= 1 and math.isclose(dv, round(dv), rel_tol=1e-6)):
            raise ValueError(
                f"expand_v must make head_dim * expand_v a positive integer (head_dim={self.head_dim}), got {self.expand_v!r}")
        lo_hi = self.A_init_range
        if not (isinstance(lo_hi, tuple | list) and len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1]):
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {lo_hi!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        check_positive(self, "norm_eps", "dt_init_floor", "initializer_range")

    def initial_state(self, batch_size: int) -> KimiDeltaAttentionState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        key_dim, w = self.num_heads * self.head_dim, self.conv_width
        return KimiDeltaAttentionState(
            conv_q=jnp.zeros((batch_size, w, key_dim), sdt),
            conv_k=jnp.zeros((batch_size, w, key_dim), sdt),
            conv_v=jnp.zeros((batch_size, w, self.value_heads * self.head_v_dim), sdt),
            S=jnp.zeros((batch_size, self.value_heads, self.head_dim, self.head_v_dim), sdt),
        )

    @nn.compact
    def __call__(self, x, state: KimiDeltaAttentionState | None = None, resets=None):
        self._check_config()
        _, _, resets, state, _ = begin_call(self, x, self.features, state, resets)
        cdt = compute_dtype(self.dtype, x)
        f32 = jnp.promote_types(cdt, jnp.float32)
        pdt = self.param_dtype
        Hk, Hv, dk, dv = self.num_heads, self.value_heads, self.head_dim, self.head_v_dim

        def proj(features, names, name, axis=-1, use_bias=False):
            return head_dense(features, names, name, dtype=cdt, param_dtype=pdt, std=self.initializer_range,
                              axis=axis, use_bias=use_bias)

        def conv(u, conv_state, name):  # u: (batch, time, heads, dim)
            if not self.use_short_conv:
                return jax.nn.silu(u), conv_state
            return short_conv(u, conv_state, resets, width=self.conv_size, use_bias=self.conv_bias, silu=True,
                              dtype=cdt, param_dtype=pdt, name=name)

        q, conv_q = conv(proj((Hk, dk), ("embed", "heads", "head_dim"), "q_proj")(x), state.conv_q, "q_conv1d")
        k, conv_k = conv(proj((Hk, dk), ("embed", "heads", "head_dim"), "k_proj")(x), state.conv_k, "k_conv1d")
        v, conv_v = conv(proj((Hv, dv), ("embed", "heads", "head_dim"), "v_proj")(x), state.conv_v, "v_conv1d")
        f = proj((Hv, dk), (None, "heads", "head_dim"), "f_b_proj")(proj(dv, ("embed", None), "f_a_proj")(x))
        b = proj(Hv, ("embed", "heads"), "b_proj")(x)
        A_log = self.param("A_log", partitioned(a_log_init(*self.A_init_range), ("heads",)), (Hv,), pdt)
        dt_bias = self.param(
            "dt_bias", partitioned(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), ("heads", "head_dim")),
            (Hv, dk), pdt)

        # H_k grouped q/k heads: value head j reads key head j // r (the op's grouped heads; with
        # per-channel decays every form of the op repeats them over the value heads)
        q, k = l2_normalize(q).astype(cdt), l2_normalize(k).astype(cdt)
        beta = jax.nn.sigmoid(b.astype(f32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        g = -jnp.exp(A_log.astype(f32))[:, None] * jax.nn.softplus(f.astype(f32) + dt_bias.astype(f32))

        o, S = delta_rule(
            heads_first(q), heads_first(k), heads_first(v), heads_first(beta), heads_first(g),
            state=state.S, resets=resets, scale=dk**-0.5, chunk_size=self.chunk_size, backend=self.backend,
            config=self.kernel_config, sharding=self.kernel_sharding,
        )
        o = jnp.moveaxis(o, 1, 2)  # (batch, time, H_v, d_v)
        gate = proj((Hv, dv), (None, "heads", "head_dim"), "g_b_proj", use_bias=True)(
            proj(dv, ("embed", None), "g_a_proj")(x))
        o = GatedRMSNorm(eps=self.norm_eps, activation="sigmoid", dtype=cdt, param_dtype=pdt, name="o_norm")(o, gate)
        y = proj(self.features, ("heads", "head_dim", "embed"), "o_proj", axis=(-2, -1))(o)
        sdt = state_dtype(self.dtype)
        return y, KimiDeltaAttentionState(
            conv_q=conv_q.astype(sdt), conv_k=conv_k.astype(sdt), conv_v=conv_v.astype(sdt), S=S.astype(sdt))


class KimiDeltaAttentionBlock(GatedDeltaNetBlock):
    """fla's ``KDABlock``: :class:`~mnemax.layers.delta_net.GatedDeltaNetBlock`'s pre-norm
    layout (RMSNorm, mixer, RMSNorm, SwiGLU MLP; the same fields) around a
    :class:`KimiDeltaAttention` mixer."""

    mixer: KimiDeltaAttention
