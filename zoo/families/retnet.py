"""The ``retnet`` family: Retentive Network blocks (Sun et al., 2023), fla's layout -- RMSNorm
pre-norm, multi-scale retention, then a SwiGLU MLP sub-block
(:class:`~mnemax.layers.linear_attention.MultiScaleRetentionBlock` holding a
:class:`~mnemax.layers.linear_attention.MultiScaleRetention`).

Defaults follow fla's ``RetNetConfig`` (flash-linear-attention 0.6.0: 8 heads, expand_k 1,
expand_v 2, output gate, hidden_ratio 2, norm_eps 1e-6); ``retnet-tiny`` is a 2-layer d 32
model of that layout.
"""

from __future__ import annotations

import dataclasses

from mnemax.layers.linear_attention import MultiScaleRetention, MultiScaleRetentionBlock
from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class RetNetConfig(BlockConfig):
    """Block options of the ``retnet`` family: the mixer's (see :class:`MultiScaleRetention`;
    ``norm_eps`` is also its output norm's) and the block's MLP (``hidden_ratio``,
    ``intermediate_size``, ``mlp_kind``)."""

    num_heads: int = layer_default(MultiScaleRetention, "num_heads")
    num_kv_heads: int | None = layer_default(MultiScaleRetention, "num_kv_heads")
    expand_k: float = layer_default(MultiScaleRetention, "expand_k")
    expand_v: float = layer_default(MultiScaleRetention, "expand_v")
    use_output_gate: bool = layer_default(MultiScaleRetention, "use_output_gate")
    rope_base: float = layer_default(MultiScaleRetention, "rope_base")
    norm_eps: float = layer_default(MultiScaleRetention, "norm_eps", also=(MultiScaleRetentionBlock,))
    initializer_range: float = layer_default(MultiScaleRetention, "initializer_range")
    hidden_ratio: float = layer_default(MultiScaleRetentionBlock, "hidden_ratio")
    intermediate_size: int | None = layer_default(MultiScaleRetentionBlock, "intermediate_size")
    mlp_kind: str = layer_default(MultiScaleRetentionBlock, "mlp_kind")
    backend: str | None = layer_default(MultiScaleRetention, "backend")
    chunk_size: int = layer_default(MultiScaleRetention, "chunk_size")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "chunk_size")
        self.check_int("num_kv_heads", optional=True)
        self.check_int("intermediate_size", low=0, optional=True)
        self.check_number("expand_k", "expand_v", "rope_base", "norm_eps", "initializer_range")
        self.check_number("hidden_ratio", positive=False)
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            self.reject("num_kv_heads", f"a divisor of num_heads ({self.num_heads})")
        self.check_choice("mlp_kind", MLP_KINDS)


def retnet_mixer(config: ModelConfig) -> MultiScaleRetention:
    """The retention mixer of a ``retnet`` config, unbound."""
    return MultiScaleRetention(
        features=config.d_model, **config.block.options_for(MultiScaleRetention), **config.layer_dtypes(), parent=None,
    )


def make_block(config: ModelConfig, index: int) -> MultiScaleRetentionBlock:
    del index
    return MultiScaleRetentionBlock(
        mixer=retnet_mixer(config), **config.block.options_for(MultiScaleRetentionBlock, exclude=("mixer",)),
        parent=None,
    )


FAMILY = register_family(
    Family(
        name="retnet",
        config=RetNetConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="RetNet multi-scale retention (fixed per-head decay, rotary q/k, fla's layout): RMSNorm "
                    "pre-norm + SwiGLU MLP",
    )
)

register_preset(
    "retnet-tiny",
    ModelConfig(
        family="retnet", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-6,
        block=RetNetConfig(num_heads=2, chunk_size=16),
    ),
)
