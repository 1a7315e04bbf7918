"""The ``lightning`` family: Lightning attention blocks (TransNormerLLM's linear attention,
Qin et al., 2023/2024) in fla's block layout -- RMSNorm pre-norm, the Lightning mixer, then a
SwiGLU MLP sub-block (:class:`~mnemax.layers.linear_attention.LightningAttentionBlock` holding a
:class:`~mnemax.layers.linear_attention.LightningAttention`).

Each block's mixer gets its depth (``layer_idx`` = the block's index, ``num_layers`` =
n_layers), which sets its fixed per-head decays -(8 h / H)(1 - l / L); the blocks therefore
differ and ``scan_layers`` is refused. ``lightning-tiny`` is a 2-layer d 32 model with 4 heads.
"""

from __future__ import annotations

import dataclasses

from mnemax.layers.linear_attention import LightningAttention, LightningAttentionBlock
from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class LightningConfig(BlockConfig):
    """Block options of the ``lightning`` family: the mixer's (see :class:`LightningAttention`;
    its depth comes from the block index) and the block's MLP (``hidden_ratio``,
    ``intermediate_size``, ``mlp_kind``)."""

    num_heads: int = layer_default(LightningAttention, "num_heads")
    head_dim: int | None = layer_default(LightningAttention, "head_dim")
    norm_eps: float = layer_default(LightningAttention, "norm_eps", also=(LightningAttentionBlock,))
    initializer_range: float = layer_default(LightningAttention, "initializer_range")
    hidden_ratio: float = layer_default(LightningAttentionBlock, "hidden_ratio")
    intermediate_size: int | None = layer_default(LightningAttentionBlock, "intermediate_size")
    mlp_kind: str = layer_default(LightningAttentionBlock, "mlp_kind")
    backend: str | None = layer_default(LightningAttention, "backend")
    chunk_size: int = layer_default(LightningAttention, "chunk_size")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "chunk_size")
        self.check_int("head_dim", optional=True)
        self.check_int("intermediate_size", low=0, optional=True)
        self.check_number("norm_eps", "initializer_range")
        self.check_number("hidden_ratio", positive=False)
        self.check_choice("mlp_kind", MLP_KINDS)


def lightning_mixer(config: ModelConfig, index: int) -> LightningAttention:
    """The Lightning mixer of block ``index`` of a ``lightning`` config, unbound."""
    return LightningAttention(
        features=config.d_model, layer_idx=index, num_layers=config.n_layers,
        **config.block.options_for(LightningAttention), **config.layer_dtypes(), parent=None,
    )


def make_block(config: ModelConfig, index: int) -> LightningAttentionBlock:
    return LightningAttentionBlock(
        mixer=lightning_mixer(config, index), **config.block.options_for(LightningAttentionBlock, exclude=("mixer",)),
        parent=None,
    )


FAMILY = register_family(
    Family(
        name="lightning",
        config=LightningConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="Lightning attention (TransNormerLLM: fixed depth-dependent per-head decay, SRMSNorm, u gate): "
                    "RMSNorm pre-norm + SwiGLU MLP",
    )
)

register_preset(
    "lightning-tiny",
    ModelConfig(
        family="lightning", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-6,
        block=LightningConfig(num_heads=4, chunk_size=16),
    ),
)
