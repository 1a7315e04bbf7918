"""The ``lssl`` family: Linear State-Space Layer blocks (HiPPO A, learned dt, FFT-conv
training, recurrent stepping; :class:`~mnemax.layers.ssm.LSSLBlock` holding an
:class:`~mnemax.layers.lssl.LSSL`)."""

from __future__ import annotations

import dataclasses

from mnemax.layers.lssl import ACTIVATIONS, LSSL, MEASURES, METHODS, MODES
from mnemax.layers.ssm import LSSLBlock

from ..config import ModelConfig
from ..model import SequenceModel
from ..registry import Family, register_family, register_preset
from .common import ResidualOptions, layer_default


@dataclasses.dataclass(frozen=True)
class LSSLConfig(ResidualOptions):
    """Block options of the ``lssl`` family: the LSSL layer's (see :class:`LSSL`) and the
    residual block's (norm, norm_eps, mlp_ratio, mlp_kind)."""

    state_size: int = layer_default(LSSL, "state_size")
    channels: int = layer_default(LSSL, "channels")
    measure: str = layer_default(LSSL, "measure")
    method: str = layer_default(LSSL, "method")
    alpha: float = layer_default(LSSL, "alpha")
    dt_min: float = layer_default(LSSL, "dt_min")
    dt_max: float = layer_default(LSSL, "dt_max")
    learn: int = layer_default(LSSL, "learn")
    activation: str = layer_default(LSSL, "activation")
    mode: str = layer_default(LSSL, "mode")

    def __post_init__(self):
        super().__post_init__()
        self.check_int("state_size", "channels")
        self.check_choice("measure", MEASURES)
        self.check_choice("method", METHODS)
        self.check_number("alpha", positive=False)
        self.check_number("dt_min", "dt_max")
        if self.dt_min > self.dt_max:
            self.reject("dt_max", f">= dt_min ({self.dt_min})")
        self.check_choice("learn", (0, 1, 2))
        self.check_choice("activation", ACTIVATIONS)
        self.check_choice("mode", MODES)


def make_block(config: ModelConfig, index: int) -> LSSLBlock:
    del index
    b = config.block
    mixer = LSSL(features=config.d_model, **b.options_for(LSSL), **config.layer_dtypes(), parent=None)
    return LSSLBlock(mixer=mixer, **b.options_for(LSSLBlock, exclude=("mixer",)), parent=None)


FAMILY = register_family(
    Family(
        name="lssl",
        config=LSSLConfig,
        make_block=make_block,
        make_model=SequenceModel,
        description="Linear State-Space Layer (HiPPO A, learned dt, FFT-conv training, recurrent stepping)",
    )
)

register_preset(
    "lssl-tiny",
    ModelConfig(family="lssl", d_model=16, n_layers=2, vocab_size=32,
                block=LSSLConfig(state_size=8, channels=2, dt_min=1e-2, dt_max=0.5)),
)
register_preset(
    "lssl-small",  # sequence classification, e.g. sequential MNIST / ListOps-style inputs
    ModelConfig(
        family="lssl", d_model=128, n_layers=4, input_dim=1, head="classify", num_classes=10, pool="mean",
        final_norm="layer", block=LSSLConfig(state_size=64, channels=1, mlp_ratio=2.0),
    ),
)
# ~125M language model of the throughput benchmark (benchmarks/throughput.py), sized like
# mamba-130m (d 768, 24 layers, tied 50k embedding) with an MLP after each SSM layer.
register_preset(
    "lssl-125m",
    ModelConfig(family="lssl", d_model=768, n_layers=24, vocab_size=50280, tie_embeddings=True,
                block=LSSLConfig(state_size=64, channels=1, mlp_ratio=2.5)),
)
