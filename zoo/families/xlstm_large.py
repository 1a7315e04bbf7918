"""The ``xlstm_large`` family: the xLSTM 7B layout (Beck et al., 2025), RMSNorm, mLSTM with
soft-capped gates, SwiGLU FFN (:class:`~mnemax.layers.xlstm.XLSTMLargeBlock` holding an
:class:`~mnemax.layers.xlstm_cells.MLSTMLargeLayer`)."""

from __future__ import annotations

import dataclasses

from mnemax.layers.xlstm import XLSTMLargeBlock
from mnemax.layers.xlstm_cells import MLSTMLargeLayer

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default
from .xlstm import small_init_std


@dataclasses.dataclass(frozen=True)
class XLSTMLargeConfig(BlockConfig):
    """Block options of the ``xlstm_large`` family: the 7B mLSTM layer's (see
    :class:`MLSTMLargeLayer`; ``num_blocks`` is the model's ``n_layers``) and the block's
    FFN width (``ffn_proj_factor``, ``ffn_round_to``)."""

    num_heads: int = layer_default(MLSTMLargeLayer, "num_heads")
    qk_dim_factor: float = layer_default(MLSTMLargeLayer, "qk_dim_factor")
    v_dim_factor: float = layer_default(MLSTMLargeLayer, "v_dim_factor")
    gate_soft_cap: float | None = layer_default(MLSTMLargeLayer, "gate_soft_cap")
    ffn_proj_factor: float = layer_default(XLSTMLargeBlock, "ffn_proj_factor")
    ffn_round_to: int = layer_default(XLSTMLargeBlock, "ffn_round_to")
    chunk_size: int = layer_default(MLSTMLargeLayer, "chunk_size")
    eps: float = layer_default(MLSTMLargeLayer, "eps")
    norm_eps: float = layer_default(MLSTMLargeLayer, "norm_eps")
    backend: str | None = layer_default(MLSTMLargeLayer, "backend")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "ffn_round_to", "chunk_size")
        self.check_number("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "eps", "norm_eps")
        self.check_number("gate_soft_cap", optional=True)


def make_block(config: ModelConfig, index: int) -> XLSTMLargeBlock:
    del index
    b = config.block
    layer = MLSTMLargeLayer(
        features=config.d_model, num_blocks=config.n_layers, **b.options_for(MLSTMLargeLayer), **config.layer_dtypes(),
        parent=None,
    )
    return XLSTMLargeBlock(mlstm=layer, **b.options_for(XLSTMLargeBlock, exclude=("mlstm",)), parent=None)


FAMILY = register_family(
    Family(
        name="xlstm_large",
        config=XLSTMLargeConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="xLSTM 7B layout: RMSNorm, mLSTM with soft-capped gates, SwiGLU FFN",
    )
)

# xLSTM 7B (Beck et al., 2025): shapes of the released model (build with jax.eval_shape).
register_preset(
    "xlstm-7b",
    ModelConfig(
        family="xlstm_large", d_model=4096, n_layers=32, vocab_size=50304, final_norm="rms", norm_eps=1e-6,
        logit_soft_cap=30.0, embed_init_std=small_init_std(4096), block=XLSTMLargeConfig(num_heads=8),
    ),
)
# The 7B layout at toy size (tests, notebooks): soft-capped gates and logits, RMSNorms.
register_preset(
    "xlstm-7b-tiny",
    ModelConfig(
        family="xlstm_large", d_model=64, n_layers=2, vocab_size=64, final_norm="rms", norm_eps=1e-6,
        logit_soft_cap=30.0, embed_init_std=small_init_std(64), block=XLSTMLargeConfig(num_heads=2, chunk_size=8),
    ),
)
