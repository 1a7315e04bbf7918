"""The ``elm`` family: the Expressive Leaky Memory neuron (v1/v2, Branch-ELM routing), as the
whole model (``neuron_model=True``: :class:`~mnemax.neuron_model.NeuronModel`, the ELM
paper's setting) or as residual layers in a stack (:class:`~mnemax.layers.elm.ELMBlock`
holding an :class:`~mnemax.layers.elm.ELMNeuron`)."""

from __future__ import annotations

import dataclasses

from mnemax.layers.elm import ROUTINGS, ELMBlock, ELMNeuron

from ..config import BlockConfig, ModelConfig
from ..model import SequenceModel
from ..neuron_model import NeuronModel
from ..registry import Family, register_family, register_preset
from .common import check_norm, layer_default


@dataclasses.dataclass(frozen=True)
class ELMConfig(BlockConfig):
    """Block options of the ``elm`` family: ``neuron_model`` (one neuron as the model), the
    neuron's (see :class:`ELMNeuron`; ``num_memory`` None means ``d_model``) and the
    stacked block's ``norm``."""

    neuron_model: bool = False
    num_memory: int | None = None  # intended: d_model memory units (ELMNeuron's own default is 100)
    version: int = layer_default(ELMNeuron, "version")
    lambda_value: float = layer_default(ELMNeuron, "lambda_value")
    mlp_num_layers: int = layer_default(ELMNeuron, "mlp_num_layers")
    tau_s_value: float = layer_default(ELMNeuron, "tau_s_value")
    memory_tau_min: float = layer_default(ELMNeuron, "memory_tau_min")
    memory_tau_max: float = layer_default(ELMNeuron, "memory_tau_max")
    learn_memory_tau: bool = layer_default(ELMNeuron, "learn_memory_tau")
    num_branch: int | None = layer_default(ELMNeuron, "num_branch")
    num_synapse_per_branch: int = layer_default(ELMNeuron, "num_synapse_per_branch")
    routing: str | None = layer_default(ELMNeuron, "routing")
    routing_seed: int = layer_default(ELMNeuron, "routing_seed")
    norm: str = layer_default(ELMBlock, "norm")

    def __post_init__(self):
        super().__post_init__()
        self.check_choice("version", (1, 2))
        self.check_int("num_memory", "num_branch", optional=True)
        self.check_int("num_synapse_per_branch")
        self.check_int("mlp_num_layers", "routing_seed", low=0)
        self.check_number("lambda_value", "tau_s_value", "memory_tau_min", "memory_tau_max")
        if self.memory_tau_min >= self.memory_tau_max:
            self.reject("memory_tau_max", f"> memory_tau_min ({self.memory_tau_min})")
        self.check_choice("routing", ROUTINGS)
        check_norm(self)


def make_block(config: ModelConfig, index: int) -> ELMBlock:
    del index
    b = config.block
    opts = b.options_for(ELMNeuron)
    opts["num_memory"] = opts["num_memory"] or config.d_model
    neuron = ELMNeuron(
        num_input=config.d_model, num_output=config.d_model, **opts, **config.layer_dtypes(), parent=None
    )
    return ELMBlock(elm=neuron, norm=b.norm, parent=None)


def make_model(config: ModelConfig, family: Family, kernel_sharding=None):
    """One neuron as the model (``neuron_model=True``), else a stack of ELM blocks."""
    if config.block.neuron_model:
        return NeuronModel(config, kernel_sharding=kernel_sharding)
    return SequenceModel(config, family=family, kernel_sharding=kernel_sharding)


FAMILY = register_family(
    Family(
        name="elm",
        config=ELMConfig,
        make_block=make_block,
        make_model=make_model,
        description="Expressive Leaky Memory neuron (v1/v2, Branch-ELM routing): one neuron as the model "
        "(neuron_model=True) or residual ELM layers in a stack",
    )
)

register_preset(
    "elm-tiny",
    ModelConfig(
        family="elm", d_model=8, n_layers=1, input_dim=6, head="classify", num_classes=4, final_norm="none",
        block=ELMConfig(neuron_model=True, num_memory=8, num_branch=3, num_synapse_per_branch=3, routing="random"),
    ),
)
register_preset(
    "elm-small",
    ModelConfig(
        family="elm", d_model=100, n_layers=1, input_dim=700, head="classify", num_classes=20, final_norm="none",
        block=ELMConfig(neuron_model=True, num_memory=100, memory_tau_max=1000.0),
    ),
)
register_preset(
    "branch-elm-small",
    ModelConfig(
        family="elm", d_model=100, n_layers=1, input_dim=700, head="classify", num_classes=20, final_norm="none",
        block=ELMConfig(neuron_model=True, num_memory=100, version=2, num_branch=64, num_synapse_per_branch=16,
                        routing="random"),
    ),
)
