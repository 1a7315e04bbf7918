"""The ``transformer`` family: pre-norm Transformer blocks (RoPE, SwiGLU) with a sliding
KV-cache state (:class:`~mnemax.layers.transformer.TransformerBlock`), the baseline."""

from __future__ import annotations

import dataclasses

from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS
from mnemax.layers.transformer import TransformerBlock

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import check_norm


@dataclasses.dataclass(frozen=True)
class TransformerConfig(BlockConfig):
    """Block options of the ``transformer`` family (see :class:`TransformerBlock`)."""

    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_ratio: float = 4.0
    mlp_kind: str = "swiglu"
    window: int = 1024
    norm: str = "rms"
    use_rope: bool = True
    key_conv: int = 0
    implementation: str | None = None
    query_block: int | None = 256  # past window + query_block steps, queries go in blocks (memory linear in T)

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
