"""The ``mamba2`` family: Mamba-2 (SSD) blocks, RMSNorm pre-norm, fp32 residual
(:class:`~mnemax.layers.mamba2.Mamba2Block` holding a :class:`~mnemax.layers.mamba2.Mamba2Mixer`)."""

from __future__ import annotations

import dataclasses
import numbers

from mnemax.layers.mamba2 import Mamba2Block, Mamba2Mixer

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class Mamba2Config(BlockConfig):
    """Block options of the ``mamba2`` family: the mixer's (see :class:`Mamba2Mixer`; its
    ``n_layers`` is the model's) and the block's ``residual_in_fp32``; ``norm_eps`` is the
    epsilon of both the block's pre-norm and the mixer's gated norm (one
    ``layer_norm_epsilon`` in ``transformers``, 1e-5 in mamba_ssm)."""

    d_state: int = layer_default(Mamba2Mixer, "d_state")
    d_conv: int = layer_default(Mamba2Mixer, "d_conv")
    expand: int = layer_default(Mamba2Mixer, "expand")
    head_dim: int = layer_default(Mamba2Mixer, "head_dim")
    n_groups: int = layer_default(Mamba2Mixer, "n_groups")
    A_init_range: tuple[float, float] = layer_default(Mamba2Mixer, "A_init_range")
    dt_min: float = layer_default(Mamba2Mixer, "dt_min")
    dt_max: float = layer_default(Mamba2Mixer, "dt_max")
    dt_init_floor: float = layer_default(Mamba2Mixer, "dt_init_floor")
    dt_limit: tuple[float, float] | None = layer_default(Mamba2Mixer, "dt_limit")
    conv_bias: bool = layer_default(Mamba2Mixer, "conv_bias")
    use_bias: bool = layer_default(Mamba2Mixer, "use_bias")
    norm_eps: float = layer_default(Mamba2Mixer, "norm_eps", also=(Mamba2Block,))
    residual_in_fp32: bool = layer_default(Mamba2Block, "residual_in_fp32")
    rescale_prenorm_residual: bool = layer_default(Mamba2Mixer, "rescale_prenorm_residual")
    backend: str | None = layer_default(Mamba2Mixer, "backend")
    chunk_size: int = layer_default(Mamba2Mixer, "chunk_size")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("d_state", "d_conv", "head_dim", "n_groups", "chunk_size")
        self.check_number("expand", "dt_min", "dt_max", "dt_init_floor", "norm_eps")
        if self.dt_min > self.dt_max:
            self.reject("dt_max", f">= dt_min ({self.dt_min})")
        if not _is_pair(self.A_init_range) or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            self.reject("A_init_range", "a pair (low, high) with 0 < low <= high")
        if self.dt_limit is not None and (not _is_pair(self.dt_limit) or not 0 <= self.dt_limit[0] < self.dt_limit[1]):
            self.reject("dt_limit", "None or a pair (low, high) with 0 <= low < high")

    def check_widths(self, d_model: int) -> None:
        """The head and group counts a model of width ``d_model`` needs (ValueError naming
        the field): head_dim divides expand * d_model and n_groups divides the heads."""
        inner = int(self.expand * d_model)
        if inner % self.head_dim:
            self.reject("head_dim", f"a divisor of d_inner = expand * d_model = {inner}")
        if (inner // self.head_dim) % self.n_groups:
            self.reject("n_groups", f"a divisor of the {inner // self.head_dim} heads")


def _is_pair(value) -> bool:
    return (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value))


def mamba2_mixer(config: ModelConfig) -> Mamba2Mixer:
    """The Mamba-2 mixer of a ``mamba2`` config, unbound."""
    config.block.check_widths(config.d_model)
    return Mamba2Mixer(
        features=config.d_model, n_layers=config.n_layers, **config.block.options_for(Mamba2Mixer),
        **config.layer_dtypes(), parent=None,
    )


def make_block(config: ModelConfig, index: int) -> Mamba2Block:
    del index
    return Mamba2Block(mixer=mamba2_mixer(config), **config.block.options_for(Mamba2Block, exclude=("mixer",)), parent=None)


FAMILY = register_family(
    Family(
        name="mamba2",
        config=Mamba2Config,
        make_block=make_block,
        make_model=SequenceModel,
        description="Mamba-2 (SSD) blocks: grouped B/C, per-head decay, gated RMSNorm; RMSNorm pre-norm, fp32 residual",
    )
)

register_preset(
    "mamba2-tiny",
    ModelConfig(
        family="mamba2", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-5,
        block=Mamba2Config(d_state=16, head_dim=16, chunk_size=16),
    ),
)
# The state-spaces/mamba2-130m and mamba2-1.3b layouts: mamba_ssm's Mamba2 defaults (d_state 128,
# head_dim 64, expand 2, n_groups 1, d_conv 4), tied embeddings, GPT-NeoX vocabulary 50277 padded
# to a multiple of 16 (``pad_vocab_size_multiple: 16`` in their config.json) = 50288.
register_preset(
    "mamba2-130m",
    ModelConfig(
        family="mamba2", d_model=768, n_layers=24, vocab_size=50288, tie_embeddings=True, norm_eps=1e-5,
        block=Mamba2Config(),
    ),
)
register_preset(
    "mamba2-1.3b",
    ModelConfig(
        family="mamba2", d_model=2048, n_layers=48, vocab_size=50288, tie_embeddings=True, norm_eps=1e-5,
        block=Mamba2Config(),
    ),
)
