"""Pieces the family modules share: the options of a pre-norm residual block with an
optional MLP (LSSL, S4D) and the check of a norm kind."""

from __future__ import annotations

import dataclasses

from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS
from mnemax.layers.norms import make_norm

from ..config import BlockConfig


def check_norm(config: BlockConfig, name: str = "norm") -> None:
    """ValueError naming ``name`` unless it is a norm kind of :func:`make_norm`."""
    try:
        make_norm(getattr(config, name), parent=None)
    except ValueError:
        config.reject(name, "'rms' or 'layer'")


@dataclasses.dataclass(frozen=True)
class ResidualOptions(BlockConfig):
    """``x + Mixer(Norm(x))`` then, if ``mlp_ratio > 0``, ``x + MLP(Norm(x))``: the norm
    kind and epsilon, the MLP's width (``mlp_ratio * d_model``) and kind."""

    norm: str = "layer"
    norm_eps: float = 1e-5
    mlp_ratio: float = 0.0
    mlp_kind: str = "gelu"

    def __post_init__(self):
        super().__post_init__()
        check_norm(self)
        self.check_number("norm_eps")
        self.check_number("mlp_ratio", positive=False)
        self.check_choice("mlp_kind", MLP_KINDS)
