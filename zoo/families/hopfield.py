"""The ``hopfield`` family: modern Hopfield layers as causal retrieval from a ring buffer of
earlier steps (:class:`~mnemax.layers.causal_hopfield.CausalHopfieldBlock`), and Hopfield
pooling for sequence classification (``pool_last``: the last block is a
:class:`~mnemax.layers.causal_hopfield.HopfieldPoolingBlock`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mnemax.layers.causal_hopfield import CausalHopfield, CausalHopfieldBlock, HopfieldPoolingBlock
from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import check_norm, layer_default


@dataclasses.dataclass(frozen=True)
class HopfieldConfig(BlockConfig):
    """Block options of the ``hopfield`` family: the causal Hopfield layer's (see
    :class:`CausalHopfield`), the block's MLP and norm, and ``pool_last`` (the last block
    pools the memory with ``pool_queries`` learned queries instead)."""

    num_heads: int = 4  # intended: the block's 4 heads (the bare CausalHopfield keeps the paper's 1)
    hidden_size: int | None = layer_default(CausalHopfield, "hidden_size")
    pattern_size: int | None = layer_default(CausalHopfield, "pattern_size")
    memory_size: int = layer_default(CausalHopfield, "memory_size")
    include_current: bool = layer_default(CausalHopfield, "include_current")
    scaling: float | Sequence[float] | None = layer_default(CausalHopfield, "scaling")
    update_steps_max: int | None = layer_default(CausalHopfield, "update_steps_max")
    update_steps_eps: float = layer_default(CausalHopfield, "update_steps_eps")
    normalize_hopfield_space: bool = layer_default(CausalHopfield, "normalize_hopfield_space")
    # > 0: causal conv of that width on the stored-pattern path (binds a value to its key)
    key_conv: int = layer_default(CausalHopfield, "key_conv")
    mlp_ratio: float = layer_default(CausalHopfieldBlock, "mlp_ratio")
    mlp_kind: str = layer_default(CausalHopfieldBlock, "mlp_kind")
    norm: str = layer_default(CausalHopfieldBlock, "norm")
    pool_last: bool = False
    pool_queries: int = 1

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "memory_size", "pool_queries")
        self.check_int("hidden_size", "pattern_size", optional=True)
        self.check_int("update_steps_max", low=0, optional=True)
        self.check_number("update_steps_eps", "mlp_ratio")
        self.check_int("key_conv", low=0)
        self.check_choice("mlp_kind", MLP_KINDS)
        check_norm(self)


def make_block(config: ModelConfig, index: int):
    b = config.block
    if b.pool_last and index == config.n_layers - 1:
        pool = CausalHopfield(
            features=config.d_model, num_heads=b.num_heads, num_queries=b.pool_queries, memory_size=b.memory_size,
            hidden_size=b.hidden_size, pattern_size=b.pattern_size, scaling=b.scaling, include_current=True,
            update_steps_max=b.update_steps_max, update_steps_eps=b.update_steps_eps, **config.layer_dtypes(),
            parent=None,
        )
        return HopfieldPoolingBlock(pool=pool, parent=None)
    hopfield = CausalHopfield(
        features=config.d_model, **b.options_for(CausalHopfield), **config.layer_dtypes(), parent=None
    )
    return CausalHopfieldBlock(hopfield=hopfield, **b.options_for(CausalHopfieldBlock, exclude=("hopfield",)), parent=None)


FAMILY = register_family(
    Family(
        name="hopfield",
        config=HopfieldConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="modern Hopfield layers: causal retrieval from a ring buffer of earlier steps "
        "(+ Hopfield pooling for sequence classification)",
    )
)

register_preset(
    "hopfield-tiny",
    ModelConfig(
        family="hopfield", d_model=32, n_layers=2, vocab_size=64,
        block=HopfieldConfig(num_heads=2, memory_size=32, mlp_ratio=2.0),
    ),
)
register_preset(
    "hopfield-125m",  # causal Hopfield LM sized like transformer-125m; 2048 stored patterns per layer
    ModelConfig(
        family="hopfield", d_model=768, n_layers=12, vocab_size=50304, tie_embeddings=True,
        block=HopfieldConfig(num_heads=12, memory_size=2048, mlp_ratio=8 / 3),
    ),
)
register_preset(
    "hopfield-small",
    ModelConfig(
        family="hopfield", d_model=128, n_layers=3, vocab_size=256, head="classify", num_classes=10,
        block=HopfieldConfig(num_heads=4, memory_size=2048, pool_last=True, pool_queries=1),
    ),
)
