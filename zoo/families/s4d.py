"""The ``s4d`` family: diagonal state-space blocks (S4D-Lin/Inv/Real, ZOH) on
``linear_scan`` (:class:`~mnemax.layers.ssm.DiagonalSSMBlock` holding a
:class:`~mnemax.layers.s4d.DiagonalSSM`)."""

from __future__ import annotations

import dataclasses

from mnemax.layers.lssl import ACTIVATIONS
from mnemax.layers.s4d import INITS, DiagonalSSM
from mnemax.layers.ssm import DiagonalSSMBlock

from ..config import ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import ResidualOptions, layer_default


@dataclasses.dataclass(frozen=True)
class S4DConfig(ResidualOptions):
    """Block options of the ``s4d`` family: the S4D layer's (see :class:`DiagonalSSM`) and
    the residual block's (norm, norm_eps, mlp_ratio, mlp_kind)."""

    state_size: int = layer_default(DiagonalSSM, "state_size")
    a_init: str = layer_default(DiagonalSSM, "a_init")
    dt_min: float = layer_default(DiagonalSSM, "dt_min")
    dt_max: float = layer_default(DiagonalSSM, "dt_max")
    activation: str = layer_default(DiagonalSSM, "activation")
    backend: str | None = layer_default(DiagonalSSM, "backend")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("state_size")
        self.check_choice("a_init", INITS)
        self.check_number("dt_min", "dt_max")
        if self.dt_min > self.dt_max:
            self.reject("dt_max", f">= dt_min ({self.dt_min})")
        self.check_choice("activation", ACTIVATIONS)


def make_block(config: ModelConfig, index: int) -> DiagonalSSMBlock:
    del index
    b = config.block
    mixer = DiagonalSSM(features=config.d_model, **b.options_for(DiagonalSSM), **config.layer_dtypes(), parent=None)
    return DiagonalSSMBlock(mixer=mixer, **b.options_for(DiagonalSSMBlock, exclude=("mixer",)), parent=None)


FAMILY = register_family(
    Family(
        name="s4d",
        config=S4DConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="diagonal state-space layer (S4D-Lin/Inv/Real, ZOH) on linear_scan",
    )
)

register_preset(
    "s4d-tiny",
    ModelConfig(family="s4d", d_model=16, n_layers=2, vocab_size=32, block=S4DConfig(state_size=8, dt_min=1e-2, dt_max=0.5)),
)
# ~125M language model of the throughput benchmark (benchmarks/throughput.py), sized like
# mamba-130m (d 768, 24 layers, tied 50k embedding) with an MLP after each SSM layer.
register_preset(
    "s4d-125m",
    ModelConfig(family="s4d", d_model=768, n_layers=24, vocab_size=50280, tie_embeddings=True,
                block=S4DConfig(state_size=64, mlp_ratio=2.5)),
)
