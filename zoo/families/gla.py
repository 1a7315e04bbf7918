"""The ``gla`` family: Gated Linear Attention blocks (Yang et al., 2023), fla's layout -- RMSNorm
pre-norm, the GLA mixer, then a SwiGLU MLP sub-block
(:class:`~mnemax.layers.linear_attention.GatedLinearAttentionBlock` holding a
:class:`~mnemax.layers.linear_attention.GatedLinearAttention`).

Presets follow fla's ``GLAConfig`` (flash-linear-attention 0.6.0: d 2048, 24 layers, 4 heads,
expand_k 0.5, expand_v 1, gate low rank 16, normalizer 16, output gate, hidden_ratio 4,
norm_eps 1e-6; its 340M / 1.3B models change only d and the depth): ``gla-125m`` scales it as
``gdn-125m`` does, to d 768, 12 layers, 4 heads (d_k 96, d_v 192), with the GPT-NeoX
vocabulary (50280, tied) so that it trains beside ``mamba-130m`` and ``transformer-125m``.
"""

from __future__ import annotations

import dataclasses
import numbers

from mnemax.layers.linear_attention import GatedLinearAttention, GatedLinearAttentionBlock
from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class GLAConfig(BlockConfig):
    """Block options of the ``gla`` family: the mixer's (see :class:`GatedLinearAttention`;
    ``norm_eps`` is also its output norm's, as in fla's model) and the block's MLP
    (``hidden_ratio``, ``intermediate_size``, ``mlp_kind``; see
    :class:`~mnemax.layers.linear_attention.LinearAttentionBlock`)."""

    num_heads: int = layer_default(GatedLinearAttention, "num_heads")
    num_kv_heads: int | None = layer_default(GatedLinearAttention, "num_kv_heads")
    expand_k: float = layer_default(GatedLinearAttention, "expand_k")
    expand_v: float = layer_default(GatedLinearAttention, "expand_v")
    use_output_gate: bool = layer_default(GatedLinearAttention, "use_output_gate")
    gate_low_rank_dim: int = layer_default(GatedLinearAttention, "gate_low_rank_dim")
    gate_logit_normalizer: float = layer_default(GatedLinearAttention, "gate_logit_normalizer")
    clamp_min: float | None = layer_default(GatedLinearAttention, "clamp_min")
    use_short_conv: bool = layer_default(GatedLinearAttention, "use_short_conv")
    conv_size: int = layer_default(GatedLinearAttention, "conv_size")
    conv_bias: bool = layer_default(GatedLinearAttention, "conv_bias")
    norm_eps: float = layer_default(GatedLinearAttention, "norm_eps", also=(GatedLinearAttentionBlock,))
    initializer_range: float = layer_default(GatedLinearAttention, "initializer_range")
    hidden_ratio: float = layer_default(GatedLinearAttentionBlock, "hidden_ratio")
    intermediate_size: int | None = layer_default(GatedLinearAttentionBlock, "intermediate_size")
    mlp_kind: str = layer_default(GatedLinearAttentionBlock, "mlp_kind")
    backend: str | None = layer_default(GatedLinearAttention, "backend")
    chunk_size: int = layer_default(GatedLinearAttention, "chunk_size")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "gate_low_rank_dim", "chunk_size", "conv_size")
        for name in ("use_short_conv", "conv_bias"):
            if not isinstance(getattr(self, name), bool):
                self.reject(name, "a bool")
        self.check_int("num_kv_heads", optional=True)
        self.check_int("intermediate_size", low=0, optional=True)
        self.check_number("expand_k", "expand_v", "gate_logit_normalizer", "norm_eps", "initializer_range")
        self.check_number("hidden_ratio", positive=False)
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            self.reject("num_kv_heads", f"a divisor of num_heads ({self.num_heads})")
        if self.clamp_min is not None and (
                isinstance(self.clamp_min, bool) or not isinstance(self.clamp_min, numbers.Real) or self.clamp_min > 0):
            self.reject("clamp_min", "None or a number <= 0 (a log decay)")
        self.check_choice("mlp_kind", MLP_KINDS)


def gla_mixer(config: ModelConfig) -> GatedLinearAttention:
    """The GLA mixer of a ``gla`` config, unbound."""
    return GatedLinearAttention(
        features=config.d_model, **config.block.options_for(GatedLinearAttention), **config.layer_dtypes(), parent=None,
    )


def make_block(config: ModelConfig, index: int) -> GatedLinearAttentionBlock:
    del index
    return GatedLinearAttentionBlock(
        mixer=gla_mixer(config), **config.block.options_for(GatedLinearAttentionBlock, exclude=("mixer",)), parent=None,
    )


FAMILY = register_family(
    Family(
        name="gla",
        config=GLAConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="Gated Linear Attention (per-key-channel decay, fla's layout): RMSNorm pre-norm + SwiGLU MLP",
    )
)

register_preset(
    "gla-tiny",
    ModelConfig(
        family="gla", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-6,
        block=GLAConfig(num_heads=2, chunk_size=16),
    ),
)
register_preset(
    "gla-125m",  # fla's GLAConfig scaled to d 768, 12 layers, 4 heads (d_k 96, d_v 192), GPT-NeoX vocab, tied
    ModelConfig(
        family="gla", d_model=768, n_layers=12, vocab_size=50280, tie_embeddings=True, norm_eps=1e-6,
        block=GLAConfig(num_heads=4, expand_k=0.5, expand_v=1.0, hidden_ratio=4.0),
    ),
)
