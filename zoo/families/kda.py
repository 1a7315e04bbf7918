"""The ``kda`` family: Kimi Delta Attention blocks (Kimi Linear, 2025: the delta rule with a
decay per key channel), fla's layout -- RMSNorm pre-norm, the KDA mixer, then a SwiGLU MLP
sub-block (:class:`~mnemax.layers.kimi_delta.KimiDeltaAttentionBlock` holding a
:class:`~mnemax.layers.kimi_delta.KimiDeltaAttention`).

Presets follow fla's ``KDAConfig`` (flash-linear-attention 0.6.0: heads of 128, expand_v 1,
short convs of 4, hidden_ratio 4, norm_eps 1e-6): ``kda-125m`` is ``gdn-125m``'s scale (d
768, 12 layers, 6 heads of 128) with the GPT-NeoX vocabulary (50280, tied).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from mnemax.layers.kimi_delta import KimiDeltaAttention, KimiDeltaAttentionBlock
from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class KDAConfig(BlockConfig):
    """Block options of the ``kda`` family: the mixer's (see :class:`KimiDeltaAttention`;
    ``norm_eps`` is also its output norm's, as in fla) and the block's MLP (``hidden_ratio``,
    ``intermediate_size``, ``mlp_kind``; see :class:`KimiDeltaAttentionBlock`)."""

    num_heads: int = layer_default(KimiDeltaAttention, "num_heads")
    num_v_heads: int | None = layer_default(KimiDeltaAttention, "num_v_heads")
    head_dim: int = layer_default(KimiDeltaAttention, "head_dim")
    expand_v: float = layer_default(KimiDeltaAttention, "expand_v")
    use_short_conv: bool = layer_default(KimiDeltaAttention, "use_short_conv")
    conv_size: int = layer_default(KimiDeltaAttention, "conv_size")
    conv_bias: bool = layer_default(KimiDeltaAttention, "conv_bias")
    allow_neg_eigval: bool = layer_default(KimiDeltaAttention, "allow_neg_eigval")
    norm_eps: float = layer_default(KimiDeltaAttention, "norm_eps", also=(KimiDeltaAttentionBlock,))
    A_init_range: tuple[float, float] = layer_default(KimiDeltaAttention, "A_init_range")
    dt_min: float = layer_default(KimiDeltaAttention, "dt_min")
    dt_max: float = layer_default(KimiDeltaAttention, "dt_max")
    dt_init_floor: float = layer_default(KimiDeltaAttention, "dt_init_floor")
    initializer_range: float = layer_default(KimiDeltaAttention, "initializer_range")
    hidden_ratio: float = layer_default(KimiDeltaAttentionBlock, "hidden_ratio")
    intermediate_size: int | None = layer_default(KimiDeltaAttentionBlock, "intermediate_size")
    mlp_kind: str = layer_default(KimiDeltaAttentionBlock, "mlp_kind")
    backend: str | None = layer_default(KimiDeltaAttention, "backend")
    chunk_size: int = layer_default(KimiDeltaAttention, "chunk_size")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "head_dim", "conv_size", "chunk_size")
        self.check_int("num_v_heads", optional=True)
        self.check_int("intermediate_size", low=0, optional=True)
        self.check_number("expand_v", "norm_eps", "dt_min", "dt_max", "dt_init_floor", "initializer_range")
        self.check_number("hidden_ratio", positive=False)
        if self.num_v_heads is not None and self.num_v_heads % self.num_heads:
            self.reject("num_v_heads", f"a multiple of num_heads ({self.num_heads})")
        dv = self.head_dim * self.expand_v
        if dv < 1 or not math.isclose(dv, round(dv), rel_tol=1e-6):
            self.reject("expand_v", f"a ratio making head_dim * expand_v a positive integer (head_dim={self.head_dim})")
        lo_hi = self.A_init_range
        if not (isinstance(lo_hi, tuple) and len(lo_hi) == 2 and all(isinstance(v, numbers.Real) for v in lo_hi)
                and 0 < lo_hi[0] <= lo_hi[1]):
            self.reject("A_init_range", "(low, high) with 0 < low <= high")
        if self.dt_min > self.dt_max:
            self.reject("dt_max", f">= dt_min ({self.dt_min})")
        self.check_choice("mlp_kind", MLP_KINDS)


def kda_mixer(config: ModelConfig) -> KimiDeltaAttention:
    """The KDA mixer of a ``kda`` config, unbound."""
    return KimiDeltaAttention(
        features=config.d_model, **config.block.options_for(KimiDeltaAttention), **config.layer_dtypes(), parent=None,
    )


def make_block(config: ModelConfig, index: int) -> KimiDeltaAttentionBlock:
    del index
    return KimiDeltaAttentionBlock(
        mixer=kda_mixer(config), **config.block.options_for(KimiDeltaAttentionBlock, exclude=("mixer",)), parent=None,
    )


FAMILY = register_family(
    Family(
        name="kda",
        config=KDAConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="Kimi Delta Attention (delta rule, per-channel decay, Kimi Linear's): RMSNorm pre-norm + SwiGLU MLP",
    )
)

register_preset(
    "kda-tiny",
    ModelConfig(
        family="kda", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-6,
        block=KDAConfig(num_heads=2, head_dim=16, chunk_size=16),
    ),
)
register_preset(
    "kda-125m",  # fla's KDAConfig at gdn-125m's scale: d 768, 12 layers, 6 heads of 128, GPT-NeoX vocab, tied
    ModelConfig(
        family="kda", d_model=768, n_layers=12, vocab_size=50280, tie_embeddings=True, norm_eps=1e-6,
        block=KDAConfig(num_heads=6, head_dim=128, hidden_ratio=4.0),
    ),
)
