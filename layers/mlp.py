"""Feed-forward blocks: gated (SwiGLU, GeGLU) and plain (GeLU) MLPs.

Gated (Shazeer, 2020): ``y = W_down (act(W_gate x) * (W_up x))`` with act = SiLU
(SwiGLU) or GeLU (GeGLU). Plain: ``y = W_down gelu(W_up x)``. Stateless: follows
the layer contract with the empty state ``()``::

    y, () = MLP(hidden=256)(x)    # x: (batch, time, d) -> y: (batch, time, d)
"""

from __future__ import annotations

import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp

from .base import Dtype, Stateless, compute_dtype, partitioned

ACTIVATIONS = ("swiglu", "geglu", "gelu")


class MLP(Stateless):
    """Position-wise MLP. ``hidden`` is the inner width; output width = input width
    unless ``out_features`` is given. Kernels carry ('embed', 'mlp') / ('mlp', 'embed')."""

    hidden: int
    kind: str = "swiglu"
    out_features: int | None = None
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    out_init: nn.initializers.Initializer | None = None

    @nn.compact
    def __call__(self, x, state=None, resets=None):
        self._check_call(x, state, resets)
        if self.kind not in ACTIVATIONS:
            raise ValueError(f"kind must be one of {ACTIVATIONS}, got {self.kind!r}")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, numbers.Integral) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")
        dt = compute_dtype(self.dtype, x)
        d_out = self.out_features or x.shape[-1]

        def dense(features, names, name, init=None):
            return nn.Dense(
                features,
                use_bias=self.use_bias,
                dtype=dt,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(init or self.kernel_init, names),
                bias_init=partitioned(nn.initializers.zeros, names[1:]),
                name=name,
            )

        up = dense(self.hidden, ("embed", "mlp"), "up")(x)
        if self.kind == "gelu":
            h = jax.nn.gelu(up)
        else:
            gate = dense(self.hidden, ("embed", "mlp"), "gate")(x)
            act = jax.nn.silu if self.kind == "swiglu" else jax.nn.gelu
            h = act(gate) * up
        y = dense(d_out, ("mlp", "embed"), "down", self.out_init)(h)
        return y, ()
