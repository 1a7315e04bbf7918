"""The ``deltanet`` family: DeltaNet blocks (Yang et al., 2024, the delta rule parallelised over
the sequence), fla's layout -- RMSNorm pre-norm, the DeltaNet mixer, then a SwiGLU MLP
sub-block (:class:`~mnemax.layers.delta_net.DeltaNetBlock` holding a
:class:`~mnemax.layers.delta_net.DeltaNet`).

Presets follow fla's ``DeltaNetConfig`` (flash-linear-attention 0.6.0) and the 340M
training config of fla's ``flame`` (``configs/delta_net_340M.json``: d 1024, 24 layers, 8
heads of 128, expand_k = expand_v = 1, silu + L2 q/k, beta, short convs of 4, no output
gate, hidden_ratio 4, norm_eps 1e-6): ``deltanet-125m`` keeps its head width (6 heads of
128 at d 768, 12 layers) with the GPT-NeoX vocabulary (50280, tied, as ``gdn-125m`` and
``mamba-130m``) so that it trains beside them.
"""

from __future__ import annotations

import dataclasses
import math

from mnemax.layers.delta_net import QK_ACTIVATIONS, QK_NORMS, DeltaNet, DeltaNetBlock
from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig(BlockConfig):
    """Block options of the ``deltanet`` family: the mixer's (see :class:`DeltaNet`;
    ``norm_eps`` is also its output norm's, as in fla) and the block's MLP
    (``hidden_ratio``, ``intermediate_size``, ``mlp_kind``; see :class:`DeltaNetBlock`)."""

    num_heads: int = layer_default(DeltaNet, "num_heads")
    expand_k: float = layer_default(DeltaNet, "expand_k")
    expand_v: float = layer_default(DeltaNet, "expand_v")
    use_beta: bool = layer_default(DeltaNet, "use_beta")
    use_gate: bool = layer_default(DeltaNet, "use_gate")
    use_short_conv: bool = layer_default(DeltaNet, "use_short_conv")
    conv_size: int = layer_default(DeltaNet, "conv_size")
    conv_bias: bool = layer_default(DeltaNet, "conv_bias")
    allow_neg_eigval: bool = layer_default(DeltaNet, "allow_neg_eigval")
    qk_activation: str = layer_default(DeltaNet, "qk_activation")
    qk_norm: str = layer_default(DeltaNet, "qk_norm")
    norm_eps: float = layer_default(DeltaNet, "norm_eps", also=(DeltaNetBlock,))
    initializer_range: float = layer_default(DeltaNet, "initializer_range")
    hidden_ratio: float = layer_default(DeltaNetBlock, "hidden_ratio")
    intermediate_size: int | None = layer_default(DeltaNetBlock, "intermediate_size")
    mlp_kind: str = layer_default(DeltaNetBlock, "mlp_kind")
    backend: str | None = layer_default(DeltaNet, "backend")
    chunk_size: int = layer_default(DeltaNet, "chunk_size")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("num_heads", "conv_size", "chunk_size")
        self.check_int("intermediate_size", low=0, optional=True)
        self.check_number("expand_k", "expand_v", "norm_eps", "initializer_range")
        self.check_number("hidden_ratio", positive=False)
        self.check_choice("qk_activation", QK_ACTIVATIONS)
        self.check_choice("qk_norm", QK_NORMS)
        self.check_choice("mlp_kind", MLP_KINDS)

    def check_widths(self, d_model: int) -> None:
        """ValueError naming expand_k / expand_v unless d_model times it is an integer
        divisible by num_heads (the widths depend on d_model, so the block checks them too)."""
        for name in ("expand_k", "expand_v"):
            dim = d_model * getattr(self, name)
            if not (math.isclose(dim, round(dim), rel_tol=1e-6) and round(dim) >= self.num_heads
                    and round(dim) % self.num_heads == 0):
                self.reject(name, f"a ratio making d_model * {name} an integer divisible by num_heads "
                                  f"(d_model={d_model}, num_heads={self.num_heads})")


def deltanet_mixer(config: ModelConfig) -> DeltaNet:
    """The DeltaNet mixer of a ``deltanet`` config, unbound."""
    config.block.check_widths(config.d_model)
    return DeltaNet(features=config.d_model, **config.block.options_for(DeltaNet), **config.layer_dtypes(), parent=None)


def make_block(config: ModelConfig, index: int) -> DeltaNetBlock:
    del index
    return DeltaNetBlock(
        mixer=deltanet_mixer(config), **config.block.options_for(DeltaNetBlock, exclude=("mixer",)), parent=None,
    )


FAMILY = register_family(
    Family(
        name="deltanet",
        config=DeltaNetConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="DeltaNet (the delta rule, no decay): RMSNorm pre-norm + SwiGLU MLP, fla's layout",
    )
)

register_preset(
    "deltanet-tiny",
    ModelConfig(
        family="deltanet", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-6,
        block=DeltaNetConfig(num_heads=2, chunk_size=16),
    ),
)
register_preset(
    "deltanet-125m",  # fla's delta_net_340M layout (heads of 128) at d 768, 12 layers, GPT-NeoX vocab, tied
    ModelConfig(
        family="deltanet", d_model=768, n_layers=12, vocab_size=50280, tie_embeddings=True, norm_eps=1e-6,
        block=DeltaNetConfig(num_heads=6, hidden_ratio=4.0),
    ),
)
