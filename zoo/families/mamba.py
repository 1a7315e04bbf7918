"""The ``mamba`` family: Mamba (selective SSM, S6) blocks, RMSNorm pre-norm, fp32 residual
(:class:`~mnemax.layers.mamba.MambaBlock` holding a :class:`~mnemax.layers.mamba.MambaMixer`)."""

from __future__ import annotations

import dataclasses

from mnemax.layers.mamba import MambaBlock, MambaMixer

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import layer_default


@dataclasses.dataclass(frozen=True)
class MambaConfig(BlockConfig):
    """Block options of the ``mamba`` family: the mixer's (see :class:`MambaMixer`; its
    ``n_layers`` is the model's) and the block's ``norm_eps`` and ``residual_in_fp32``."""

    d_state: int = layer_default(MambaMixer, "d_state")
    d_conv: int = layer_default(MambaMixer, "d_conv")
    expand: int = layer_default(MambaMixer, "expand")
    dt_rank: int | str = layer_default(MambaMixer, "dt_rank")
    dt_min: float = layer_default(MambaMixer, "dt_min")
    dt_max: float = layer_default(MambaMixer, "dt_max")
    dt_init: str = layer_default(MambaMixer, "dt_init")
    dt_scale: float = layer_default(MambaMixer, "dt_scale")
    dt_init_floor: float = layer_default(MambaMixer, "dt_init_floor")
    conv_bias: bool = layer_default(MambaMixer, "conv_bias")
    use_bias: bool = layer_default(MambaMixer, "use_bias")
    norm_eps: float = layer_default(MambaBlock, "norm_eps")
    residual_in_fp32: bool = layer_default(MambaBlock, "residual_in_fp32")
    rescale_prenorm_residual: bool = layer_default(MambaMixer, "rescale_prenorm_residual")
    backend: str | None = layer_default(MambaMixer, "backend")
    chunk_size: int | None = layer_default(MambaMixer, "chunk_size")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("d_state", "d_conv")
        self.check_number("expand", "dt_min", "dt_max", "dt_scale", "dt_init_floor", "norm_eps")
        if self.dt_min > self.dt_max:
            self.reject("dt_max", f">= dt_min ({self.dt_min})")
        if self.dt_rank != "auto":
            self.check_int("dt_rank")
        self.check_choice("dt_init", ("random", "constant"))
        self.check_int("chunk_size", optional=True)


def mamba_mixer(config: ModelConfig) -> MambaMixer:
    """The Mamba mixer of a ``mamba`` (or ``memmamba``) config, unbound."""
    return MambaMixer(
        features=config.d_model, n_layers=config.n_layers, **config.block.options_for(MambaMixer),
        **config.layer_dtypes(), parent=None,
    )


def make_block(config: ModelConfig, index: int) -> MambaBlock:
    del index
    return MambaBlock(mixer=mamba_mixer(config), **config.block.options_for(MambaBlock, exclude=("mixer",)), parent=None)


FAMILY = register_family(
    Family(
        name="mamba",
        config=MambaConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="Mamba (selective SSM, S6) blocks: RMSNorm pre-norm, fp32 residual",
    )
)

register_preset(
    "mamba-tiny",
    ModelConfig(
        family="mamba", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-5,
        block=MambaConfig(d_state=8),
    ),
)
register_preset(
    "mamba-130m",  # the state-spaces/mamba-130m layout (vocab 50277 padded to 50280)
    ModelConfig(
        family="mamba", d_model=768, n_layers=24, vocab_size=50280, tie_embeddings=True, norm_eps=1e-5,
        block=MambaConfig(d_state=16, d_conv=4, expand=2),
    ),
)
register_preset(
    "mamba-1.4b",  # the state-spaces/mamba-1.4b layout (d 2048, 48 layers); for the multi-GPU scaling runs
    ModelConfig(
        family="mamba", d_model=2048, n_layers=48, vocab_size=50280, tie_embeddings=True, norm_eps=1e-5,
        block=MambaConfig(d_state=16, d_conv=4, expand=2),
    ),
)
