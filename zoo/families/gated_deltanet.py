"""The ``gated_deltanet`` family: Gated DeltaNet blocks (Yang, Kautz & Hatamizadeh, 2024), fla's
layout -- RMSNorm pre-norm, the GDN mixer, then a SwiGLU MLP sub-block
(:class:`~mnemax.layers.delta_net.GatedDeltaNetBlock` holding a
:class:`~mnemax.layers.delta_net.GatedDeltaNet`).

Presets follow fla's ``GatedDeltaNetConfig`` (flash-linear-attention 0.6.0, whose defaults
are its 1.3B model: d 2048, 21 layers, 6 heads of 256, expand_v 2, hidden_ratio 4, norm_eps
1e-6, vocab 32000, untied): ``gdn-1.3b`` is that layout; ``gdn-125m`` scales it to d 768, 12
layers, 6 heads of 128 (expand_v 2, fla's default) with the GPT-NeoX vocabulary (50280,
tied, as ``mamba-130m``) so that it trains beside ``mamba-130m`` and ``transformer-125m``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from mnemax.layers.delta_net import GatedDeltaNet, GatedDeltaNetBlock
from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig(BlockConfig):
    """Block options of the ``gated_deltanet`` family: the mixer's (see :class:`GatedDeltaNet`;
    ``norm_eps`` is also its output norm's, as in fla) and the block's MLP
    (``hidden_ratio``, ``intermediate_size``, ``mlp_kind``; see :class:`GatedDeltaNetBlock`)."""

    num_heads: int = layer_default(GatedDeltaNet, "num_heads")
    num_v_heads: int | None = layer_default(GatedDeltaNet, "num_v_heads")
    head_dim: int = layer_default(GatedDeltaNet, "head_dim")
    expand_v: float = layer_default(GatedDeltaNet, "expand_v")
    conv_size: int = layer_default(GatedDeltaNet, "conv_size")
    conv_bias: bool = layer_default(GatedDeltaNet, "conv_bias")
    use_gate: bool = layer_default(GatedDeltaNet, "use_gate")
    allow_neg_eigval: bool = layer_default(GatedDeltaNet, "allow_neg_eigval")
    norm_eps: float = layer_default(GatedDeltaNet, "norm_eps", also=(GatedDeltaNetBlock,))
    A_init_range: tuple[float, float] = layer_default(GatedDeltaNet, "A_init_range")
    dt_min: float = layer_default(GatedDeltaNet, "dt_min")
    dt_max: float = layer_default(GatedDeltaNet, "dt_max")
    dt_init_floor: float = layer_default(GatedDeltaNet, "dt_init_floor")
    initializer_range: float = layer_default(GatedDeltaNet, "initializer_range")
    hidden_ratio: float = layer_default(GatedDeltaNetBlock, "hidden_ratio")
    intermediate_size: int | None = layer_default(GatedDeltaNetBlock, "intermediate_size")
    mlp_kind: str = layer_default(GatedDeltaNetBlock, "mlp_kind")
    backend: str | None = layer_default(GatedDeltaNet, "backend")
    chunk_size: int = layer_default(GatedDeltaNet, "chunk_size")

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


def gated_deltanet_mixer(config: ModelConfig) -> GatedDeltaNet:
    """The GDN mixer of a ``gated_deltanet`` config, unbound."""
    return GatedDeltaNet(
        features=config.d_model, **config.block.options_for(GatedDeltaNet), **config.layer_dtypes(), parent=None,
    )


def make_block(config: ModelConfig, index: int) -> GatedDeltaNetBlock:
    del index
    return GatedDeltaNetBlock(
        mixer=gated_deltanet_mixer(config), **config.block.options_for(GatedDeltaNetBlock, exclude=("mixer",)),
        parent=None,
    )


FAMILY = register_family(
    Family(
        name="gated_deltanet",
        config=GatedDeltaNetConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="Gated DeltaNet (gated delta rule, Qwen3-Next's linear layer): RMSNorm pre-norm + SwiGLU MLP",
    )
)

register_preset(
    "gdn-tiny",
    ModelConfig(
        family="gated_deltanet", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-6,
        block=GatedDeltaNetConfig(num_heads=2, head_dim=16, expand_v=1.0, chunk_size=16),
    ),
)
register_preset(
    "gdn-125m",  # fla's GatedDeltaNetConfig scaled to d 768 (6 heads of 128, expand_v 2), GPT-NeoX vocab, tied
    ModelConfig(
        family="gated_deltanet", d_model=768, n_layers=12, vocab_size=50280, tie_embeddings=True, norm_eps=1e-6,
        block=GatedDeltaNetConfig(num_heads=6, head_dim=128, expand_v=2.0, hidden_ratio=4.0),
    ),
)
register_preset(
    "gdn-1.3b",  # fla's GatedDeltaNetConfig defaults (its 1.3B model): d 2048, 21 layers, 6 x 256, vocab 32000
    ModelConfig(
        family="gated_deltanet", d_model=2048, n_layers=21, vocab_size=32000, tie_embeddings=False, norm_eps=1e-6,
        block=GatedDeltaNetConfig(num_heads=6, head_dim=256, expand_v=2.0, hidden_ratio=4.0),
    ),
)
