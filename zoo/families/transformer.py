"""The ``transformer`` family: pre-norm Transformer blocks (RoPE, SwiGLU) with a sliding
KV-cache state (:class:`~mnemax.layers.transformer.TransformerBlock`), the baseline."""

from __future__ import annotations

import dataclasses

from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS
from mnemax.layers.transformer import TransformerBlock

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import check_norm, layer_default


@dataclasses.dataclass(frozen=True)
class TransformerConfig(BlockConfig):
    """Block options of the ``transformer`` family (see :class:`TransformerBlock`)."""

    num_heads: int = 4  # TransformerBlock.num_heads has no default
    num_kv_heads: int | None = layer_default(TransformerBlock, "num_kv_heads")
    head_dim: int | None = layer_default(TransformerBlock, "head_dim")
    mlp_ratio: float = layer_default(TransformerBlock, "mlp_ratio")
    mlp_kind: str = layer_default(TransformerBlock, "mlp_kind")
    window: int = layer_default(TransformerBlock, "window")
    norm: str = layer_default(TransformerBlock, "norm")
    use_rope: bool = layer_default(TransformerBlock, "use_rope")
    key_conv: int = layer_default(TransformerBlock, "key_conv")
    implementation: str | None = layer_default(TransformerBlock, "implementation")
    # past window + query_block steps, queries go in blocks (memory linear in T)
    query_block: int | None = layer_default(TransformerBlock, "query_block")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "window")
        self.check_int("num_kv_heads", "head_dim", "query_block", optional=True)
        self.check_int("key_conv", low=0)
        self.check_number("mlp_ratio")
        self.check_choice("mlp_kind", MLP_KINDS)
        check_norm(self)


def make_block(config: ModelConfig, index: int) -> TransformerBlock:
    del index
    return TransformerBlock(
        features=config.d_model, **config.block.options_for(TransformerBlock), **config.layer_dtypes(), parent=None
    )


FAMILY = register_family(
    Family(
        name="transformer",
        config=TransformerConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="pre-norm Transformer (RoPE, SwiGLU) with a sliding KV-cache state; the baseline",
    )
)

register_preset(
    "transformer-tiny",
    ModelConfig(
        family="transformer", d_model=32, n_layers=2, vocab_size=64,
        block=TransformerConfig(num_heads=2, window=64, mlp_ratio=2.0),
    ),
)
register_preset(
    "transformer-125m",
    ModelConfig(
        family="transformer", d_model=768, n_layers=12, vocab_size=50304, tie_embeddings=True,
        block=TransformerConfig(num_heads=12, window=2048, mlp_ratio=8 / 3),
    ),
)
