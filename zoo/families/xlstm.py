"""The ``xlstm`` family: xLSTM[a:b] (NeurIPS 2024), mLSTM blocks with sLSTM blocks at
``slstm_at`` (the blocks of :class:`~mnemax.layers.xlstm.XLSTMStack`, built by its
``make_block``), and the presets of the paper's sizes."""

from __future__ import annotations

import dataclasses

from mnemax.layers.xlstm import XLSTMStack
from mnemax.layers.xlstm_cells import FFN_ACTIVATIONS, SLSTM_BIAS_INITS
from mnemax.layers.xlstm_widths import ROUND_MODES

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class XLSTMConfig(BlockConfig):
    """Block options of the ``xlstm`` family: where the sLSTM blocks are (``slstm_at``: block
    indices, or "all"), the mLSTM blocks' options, the sLSTM blocks' (``slstm_*``, ``ffn_*``)
    and the blocks' layer-norm epsilon (see :class:`XLSTMStack`)."""

    slstm_at: tuple[int, ...] | str = layer_default(XLSTMStack, "slstm_at")  # block indices of sLSTM blocks, or "all"
    num_heads: int = layer_default(XLSTMStack, "num_heads")  # mLSTM heads
    proj_factor: float = layer_default(XLSTMStack, "proj_factor")
    # the mLSTM inner width is proj_factor * d rounded to a multiple of this
    round_to: int = layer_default(XLSTMStack, "round_to")
    # ... up or down (layers/xlstm_widths.py)
    round_mode: str = layer_default(XLSTMStack, "round_mode")
    conv_width: int = layer_default(XLSTMStack, "conv_width")
    qkv_blocksize: int = layer_default(XLSTMStack, "qkv_blocksize")
    chunk_size: int = layer_default(XLSTMStack, "chunk_size")
    eps: float = layer_default(XLSTMStack, "eps")
    backend: str | None = layer_default(XLSTMStack, "backend")
    slstm_heads: int = layer_default(XLSTMStack, "slstm_heads")
    slstm_conv_width: int = layer_default(XLSTMStack, "slstm_conv_width")
    slstm_bias_init: str = layer_default(XLSTMStack, "slstm_bias_init")
    slstm_backend: str | None = layer_default(XLSTMStack, "slstm_backend")
    ffn_proj_factor: float | None = layer_default(XLSTMStack, "ffn_proj_factor")
    ffn_act: str = layer_default(XLSTMStack, "ffn_act")
    ffn_round_to: int = layer_default(XLSTMStack, "ffn_round_to")
    ffn_round_mode: str = layer_default(XLSTMStack, "ffn_round_mode")
    norm_eps: float = layer_default(XLSTMStack, "norm_eps")

    def __post_init__(self):
        super().__post_init__()
        at = self.slstm_at
        if isinstance(at, str):
            if at != "all":
                self.reject("slstm_at", "a tuple of block indices or 'all'")
        elif any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in at):
            self.reject("slstm_at", "a tuple of block indices (ints >= 0) or 'all'")
        self.check_int("num_heads", "round_to", "qkv_blocksize", "chunk_size", "slstm_heads", "ffn_round_to")
        self.check_int("conv_width", "slstm_conv_width", low=0)
        self.check_number("proj_factor", "eps", "norm_eps")
        self.check_number("ffn_proj_factor", optional=True)
        self.check_choice("round_mode", ROUND_MODES)
        self.check_choice("ffn_round_mode", ROUND_MODES)
        self.check_choice("slstm_bias_init", SLSTM_BIAS_INITS)
        self.check_choice("ffn_act", FFN_ACTIVATIONS)


def make_block(config: ModelConfig, index: int):
    stack = XLSTMStack(
        features=config.d_model, n_blocks=config.n_layers, post_norm=False, **config.block.options_for(XLSTMStack),
        **config.layer_dtypes(), parent=None,
    )
    return stack.make_block(index, parent=None)


def small_init_std(d: int) -> float:
    """Upstream xLSTM initialises the token embedding with N(0, 2 / (5 d))."""
    return (2.0 / (5.0 * d)) ** 0.5


FAMILY = register_family(
    Family(
        name="xlstm",
        config=XLSTMConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="xLSTM[a:b] (NeurIPS 2024): mLSTM blocks with sLSTM blocks at slstm_at",
    )
)

_TINY = dict(
    family="xlstm", d_model=32, n_layers=2, vocab_size=64, final_norm="layer_nobias", norm_eps=1e-5,
    embed_init_std=small_init_std(32),
)
_TINY_BLOCK = {"num_heads": 2, "slstm_heads": 2, "chunk_size": 16}
register_preset("xlstm-tiny", ModelConfig(**_TINY, block=XLSTMConfig(**_TINY_BLOCK, slstm_at=(1,))))
register_preset("slstm-tiny", ModelConfig(**_TINY, block=XLSTMConfig(**_TINY_BLOCK, slstm_at="all")))
register_preset("mlstm-tiny", ModelConfig(**_TINY, block=XLSTMConfig(**_TINY_BLOCK, slstm_at=())))
# Paper sizes, xLSTM[7:1]: one sLSTM block in every eight (the paper fixes the ratio; the
# positions 3, 11, 19, ... are our choice).
register_preset(
    "xlstm-125m",
    ModelConfig(
        family="xlstm", d_model=768, n_layers=24, vocab_size=50304, final_norm="layer_nobias", norm_eps=1e-5,
        embed_init_std=small_init_std(768), block=XLSTMConfig(slstm_at=(3, 11, 19)),
    ),
)
register_preset(
    "xlstm-1.3b",
    ModelConfig(
        family="xlstm", d_model=2048, n_layers=48, vocab_size=50304, final_norm="layer_nobias", norm_eps=1e-5,
        embed_init_std=small_init_std(2048), block=XLSTMConfig(slstm_at=(3, 11, 19, 27, 35, 43)),
    ),
)
