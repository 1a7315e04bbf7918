"""Pieces the family modules share: :func:`layer_default` (a family config's default taken
from the layer that holds the option), the options of a pre-norm residual block with an
optional MLP (LSSL, S4D) and the check of a norm kind."""

from __future__ import annotations

import dataclasses

from mnemax.layers.mlp import ACTIVATIONS as MLP_KINDS
from mnemax.layers.norms import make_norm
from mnemax.layers.ssm import DiagonalSSMBlock, LSSLBlock

from ..config import BlockConfig

_IMMUTABLE = (int, float, str, bool, type(None))


def _immutable(value) -> bool:
    return isinstance(value, _IMMUTABLE) or (isinstance(value, tuple) and all(_immutable(v) for v in value))


def layer_default(module_cls: type, name: str, *, also: tuple[type, ...] = ()):
    """The default of field ``name`` of the flax module (dataclass) ``module_cls``, so that a
    family config states the default of an option its block hands to that layer once, in
    the layer. ``also``: other layer classes the option reaches, whose default must be the
    same. Raises (at import of the family module) if a class has no such field, the field
    has no plain default, the defaults differ, or the default is not immutable (int, float,
    str, bool, None or a tuple of them: a config field with a mutable default needs
    ``dataclasses.field(default_factory=...)`` instead)."""
    defaults = []
    for cls in (module_cls, *also):
        field = {f.name: f for f in dataclasses.fields(cls)}.get(name)
        if field is None:
            raise AttributeError(f"{cls.__name__} has no field {name!r}")
        if field.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{name} has no default (or only a default_factory)")
        if not _immutable(field.default):
            raise TypeError(f"{cls.__name__}.{name} defaults to {field.default!r}, not an int, float, str, bool, "
                            "None or tuple of them; a mutable default needs dataclasses.field(default_factory=...)")
        defaults.append(field.default)
    if any(d != defaults[0] for d in defaults[1:]):
        names = ", ".join(f"{c.__name__}.{name}={d!r}" for c, d in zip((module_cls, *also), defaults))
        raise ValueError(f"the layers disagree on the default of {name!r}: {names}")
    return defaults[0]


def check_norm(config: BlockConfig, name: str = "norm") -> None:
    """ValueError naming ``name`` unless it is a norm kind of :func:`make_norm`."""
    try:
        make_norm(getattr(config, name), parent=None)
    except ValueError:
        config.reject(name, "'rms' or 'layer'")


@dataclasses.dataclass(frozen=True)
class ResidualOptions(BlockConfig):
    """``x + Mixer(Norm(x))`` then, if ``mlp_ratio > 0``, ``x + MLP(Norm(x))``: the norm
    kind and epsilon, the MLP's width (``mlp_ratio * d_model``) and kind (the defaults of
    :class:`LSSLBlock`, the same as :class:`DiagonalSSMBlock`'s)."""

    norm: str = layer_default(LSSLBlock, "norm", also=(DiagonalSSMBlock,))
    norm_eps: float = layer_default(LSSLBlock, "norm_eps", also=(DiagonalSSMBlock,))
    mlp_ratio: float = layer_default(LSSLBlock, "mlp_ratio", also=(DiagonalSSMBlock,))
    mlp_kind: str = layer_default(LSSLBlock, "mlp_kind", also=(DiagonalSSMBlock,))

    def __post_init__(self):
        super().__post_init__()
        check_norm(self)
        self.check_number("norm_eps")
        self.check_number("mlp_ratio", positive=False)
        self.check_choice("mlp_kind", MLP_KINDS)
