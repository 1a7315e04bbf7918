"""The ``hcam`` family: Transformer blocks with Hierarchical Chunk Attention Memory, local
attention in the current chunk + top-k chunk retrieval from a ring buffer of past chunks
(:class:`~mnemax.layers.hcam.HCAMBlock` holding an :class:`~mnemax.layers.hcam.HCAMAttention`)."""

from __future__ import annotations

import dataclasses

from mnemax.layers.hcam import HCAMAttention, HCAMBlock
from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import check_norm, layer_default


@dataclasses.dataclass(frozen=True)
class HCAMConfig(BlockConfig):
    """Block options of the ``hcam`` family: the HCAM attention's (see
    :class:`HCAMAttention`) and the block's MLP and norm."""

    num_heads: int = layer_default(HCAMAttention, "num_heads")
    chunk_size: int = layer_default(HCAMAttention, "chunk_size")
    num_chunks: int = layer_default(HCAMAttention, "num_chunks")
    top_k: int = layer_default(HCAMAttention, "top_k")
    key_size: int | None = layer_default(HCAMAttention, "key_size")
    memory_position_encoding: bool = layer_default(HCAMAttention, "memory_position_encoding")
    stop_gradient_memory: bool = layer_default(HCAMAttention, "stop_gradient_memory")
    persist_across_resets: bool = layer_default(HCAMAttention, "persist_across_resets")
    impl: str = layer_default(HCAMAttention, "impl")
    mlp_ratio: float = layer_default(HCAMBlock, "mlp_ratio")
    mlp_kind: str = layer_default(HCAMBlock, "mlp_kind")
    norm: str = layer_default(HCAMBlock, "norm")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "chunk_size", "num_chunks", "top_k")
        if self.top_k > self.num_chunks:
            self.reject("top_k", f"<= num_chunks ({self.num_chunks})")
        self.check_int("key_size", optional=True)
        self.check_choice("impl", ("parallel", "sequential"))
        self.check_number("mlp_ratio")
        self.check_choice("mlp_kind", MLP_KINDS)
        check_norm(self)


def make_block(config: ModelConfig, index: int) -> HCAMBlock:
    del index
    b = config.block
    hcam = HCAMAttention(features=config.d_model, **b.options_for(HCAMAttention), **config.layer_dtypes(), parent=None)
    return HCAMBlock(hcam=hcam, **b.options_for(HCAMBlock, exclude=("hcam",)), parent=None)


FAMILY = register_family(
    Family(
        name="hcam",
        config=HCAMConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="Transformer with Hierarchical Chunk Attention Memory: local attention in the "
        "current chunk + top-k chunk retrieval from a ring buffer of past chunks",
    )
)

register_preset(
    "hcam-tiny",
    ModelConfig(
        family="hcam", d_model=32, n_layers=2, vocab_size=64,
        block=HCAMConfig(num_heads=2, chunk_size=4, num_chunks=8, top_k=2, mlp_ratio=2.0),
    ),
)
register_preset(
    "hcam-125m",  # HCAM LM of ~125M parameters; 128 chunks of 16 steps (2048 tokens) of memory per layer
    ModelConfig(
        family="hcam", d_model=768, n_layers=8, vocab_size=50304, tie_embeddings=True,
        block=HCAMConfig(num_heads=12, chunk_size=16, num_chunks=128, top_k=8, mlp_ratio=8 / 3),
    ),
)
register_preset(
    "hcam-small",
    ModelConfig(
        family="hcam", d_model=256, n_layers=4, vocab_size=256,
        block=HCAMConfig(num_heads=4, chunk_size=16, num_chunks=64, top_k=4),
    ),
)
