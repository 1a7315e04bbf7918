"""Registry of model families and presets (a leaf: it imports no family and no model).

A *family* is registered by its own module under :mod:`mnemax.families`: its typed
block-config dataclass, how to build block ``i`` of a model from a :class:`ModelConfig`,
and which model class runs the blocks. A *preset* is a named config. Users call::

    model = mnemax.create("transformer-tiny", d_model=64, num_heads=4)
    mnemax.list_models()          # every preset
    mnemax.list_families()        # every family

Overrides that name a top-level :class:`ModelConfig` field replace it; any other
keyword must be one of the family's block options (the fields of its config class).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mnemax.kernels.sharding import KernelSharding


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family.

    Attributes:
      name: the family name used in configs.
      config: its block-config class (a frozen :class:`~mnemax.config.BlockConfig`
        dataclass): the block options and their defaults.
      make_block: ``make_block(config, index) -> nn.Module``: block ``index`` of a model of
        ``config``, unbound (``parent=None``); the module follows the layer contract on
        (batch, time, d_model) and holds its mixer as a field.
      make_model: ``make_model(config=, family=, kernel_sharding=) -> nn.Module``: the model
        (:class:`~mnemax.model.SequenceModel` for a stack of independent blocks).
      description: one line for ``list_models``/README.
    """

    name: str
    config: type
    make_block: Callable[..., Any]
    make_model: Callable[..., Any]
    description: str = ""

    @property
    def block_keys(self) -> dict[str, Any]:
        """``{option: default}`` of the family's block options (derived from ``config``)."""
        return self.config.defaults()


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, Any] = {}


def register_family(family: Family) -> Family:
    if not isinstance(family, Family):
        raise TypeError(f"family must be a Family, got {type(family).__name__}")
    if family.name in _FAMILIES and _FAMILIES[family.name] != family:
        raise ValueError(f"family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {name!r}")
    return _FAMILIES[name]


def list_families() -> list[str]:
    """Names of every registered family."""
    return sorted(_FAMILIES)


def register_preset(name: str, config):
    """Registers ``config`` (a ModelConfig of a registered family) as preset ``name``."""
    config = config.replace(preset=name)
    _PRESETS[name] = config
    return config


def list_models(family: str | None = None) -> list[str]:
    """Names of every registered preset (of ``family`` only, if given)."""
    if family is not None:
        get_family(family)
        return sorted(n for n, c in _PRESETS.items() if c.family == family)
    return sorted(_PRESETS)


def tiny_preset(family: str) -> str:
    """The family's smallest preset for tests and task configs: ``<family>-tiny`` if
    registered, else its first ``*-tiny`` preset (ValueError if it has none)."""
    names = [n for n in list_models(family) if n.endswith("-tiny")]
    if not names:
        raise ValueError(f"family {family!r} has no '*-tiny' preset; its presets: {list_models(family)}")
    return f"{family}-tiny" if f"{family}-tiny" in names else names[0]


def get_config(name: str, **overrides):
    """The preset's config with ``overrides`` applied (see module docstring)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return _PRESETS[name].replace(**overrides) if overrides else _PRESETS[name]


def build(config, kernel_sharding: KernelSharding | None = None):
    """The flax module for ``config`` (the family is resolved here, once).

    ``kernel_sharding`` says which mesh axes split the batch and the heads/channels of the
    Pallas kernels (see :mod:`mnemax.kernels.sharding`); every block whose mixer has a
    ``kernel_sharding`` field gets it. It is where the model runs, not part of the config
    (nor of a release bundle)."""
    if kernel_sharding is not None and not isinstance(kernel_sharding, KernelSharding):
        raise TypeError(
            f"kernel_sharding must be a mnemax.kernels.sharding.KernelSharding or None, got {type(kernel_sharding).__name__}"
        )
    family = get_family(config.family)
    return family.make_model(config=config, family=family, kernel_sharding=kernel_sharding)


def create(name: str, kernel_sharding: KernelSharding | None = None, **overrides):
    """A model from a registered preset, with overrides (top-level fields or block options)."""
    return build(get_config(name, **overrides), kernel_sharding=kernel_sharding)
