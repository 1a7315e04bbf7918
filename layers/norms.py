"""Normalisation layers: RMSNorm and LayerNorm.

Both normalise over the last axis in float32 and follow the layer contract with the
empty state ``()``::

    y, () = RMSNorm()(x)          # x: (..., features) -> y: same shape

RMSNorm (Zhang & Sennrich, 2019): ``y = x / sqrt(mean(x^2) + eps) * scale``.
LayerNorm (Ba et al., 2016): ``y = (x - mean) / sqrt(var + eps) * scale + bias``.

The functional forms :func:`rms_norm` and :func:`layer_norm` are exported for
callers that hold their own parameters (per-head norms, tests).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .base import Dtype, Stateless, compute_dtype, partitioned


def rms_norm(x, scale=None, eps: float = 1e-6):
    """RMS normalisation over the last axis, computed in float32 (or float64)."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(dt)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(dt)
    return y


def layer_norm(x, scale=None, bias=None, eps: float = 1e-5):
    """Layer normalisation over the last axis, computed in float32 (or float64)."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(dt)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(dt)
    if bias is not None:
        y = y + bias.astype(dt)
    return y


class RMSNorm(Stateless):
    """RMSNorm over the last axis with a learned scale (logical axis ``axis_name``)."""

    eps: float = 1e-6
    use_scale: bool = True
    axis_name: str | None = "embed"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, state=None, resets=None):
        self._check_call(x, state, resets)
        scale = None
        if self.use_scale:
            scale = self.param(
                "scale", partitioned(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype
            )
        y = rms_norm(x, scale, self.eps)
        return y.astype(compute_dtype(self.dtype, x)), ()


class LayerNorm(Stateless):
    """LayerNorm over the last axis with learned scale and bias."""

    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str | None = "embed"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, state=None, resets=None):
        self._check_call(x, state, resets)
        d = x.shape[-1]
        scale = bias = None
        if self.use_scale:
            scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (d,), self.param_dtype)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, (self.axis_name,)), (d,), self.param_dtype)
        y = layer_norm(x, scale, bias, self.eps)
        return y.astype(compute_dtype(self.dtype, x)), ()


def make_norm(kind: str, **kwargs) -> Stateless:
    """``'rms'`` -> RMSNorm, ``'layer'`` -> LayerNorm."""
    if kind == "rms":
        return RMSNorm(**kwargs)
    if kind == "layer":
        return LayerNorm(**kwargs)
    raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")
