"""The Transformer baseline block: pre-norm attention and MLP with residuals.

``x = x + Attn(Norm(x)); x = x + MLP(Norm(x))`` (the GPT-2 / LLaMA layout), with the
KV-cache state of :class:`~mnemax.layers.attention.CausalSelfAttention`::

    y, state = TransformerBlock(features=F, num_heads=H)(x, state, resets)
    x, y: (batch, time, F);  state: AttentionState
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .attention import AttentionState, CausalSelfAttention
from .base import Dtype, check_sequence
from .mlp import MLP
from .norms import make_norm


class TransformerBlock(nn.Module):
    features: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_ratio: float = 4.0
    mlp_kind: str = "swiglu"
    window: int = 1024
    norm: str = "rms"
    use_rope: bool = True
    key_conv: int = 0
    implementation: str | None = None
    query_block: int | None = 256  # CausalSelfAttention.query_block: memory linear in long sequences
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _attention(self, **kw) -> CausalSelfAttention:
        return CausalSelfAttention(
            features=self.features,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            window=self.window,
            use_rope=self.use_rope,
            key_conv=self.key_conv,
            implementation=self.implementation,
            query_block=self.query_block,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **kw,
        )

    def initial_state(self, batch_size: int) -> AttentionState:
        return self._attention(parent=None).initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: AttentionState | None = None, resets=None):
        check_sequence(x, self.features)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, _ = make_norm(self.norm, name="attn_norm", **kw)(x)
        h, state = self._attention(name="attn")(h, state, resets)
        x = x + h.astype(x.dtype)
        h, _ = make_norm(self.norm, name="mlp_norm", **kw)(x)
        hidden = int(round(self.mlp_ratio * self.features))
        h, _ = MLP(hidden=hidden, kind=self.mlp_kind, name="mlp", **kw)(h)
        return x + h.astype(x.dtype), state
