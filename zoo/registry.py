"""Registry of model families and presets.

A *family* says how to build block ``i`` of a model from a :class:`ModelConfig`
(and which block keywords it accepts); a *preset* is a named config. Users call::

    model = mnemax.create("transformer-tiny", d_model=64, num_heads=4)
    mnemax.list_models()

Overrides that name a top-level :class:`ModelConfig` field replace it; any other
key must be one of the family's block keywords.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .config import FrozenDict, ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build a family's blocks.

    Attributes:
      name: the family name used in configs.
      make_block: ``make_block(config, index, **module_kwargs) -> nn.Module``; the module
        follows the layer contract on (batch, time, d_model).
      block_keys: the block keywords the family accepts (with defaults).
      description: one line for ``list_models``/README.
      make_model: optional ``make_model(config) -> nn.Module`` for families whose model
        is more than a stack of independent blocks; None uses :class:`SequenceModel`.
    """

    name: str
    make_block: Callable[..., Any]
    block_keys: Mapping[str, Any]
    description: str = ""
    make_model: Callable[[ModelConfig], Any] | None = None


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, ModelConfig] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    _ensure_loaded()
    if name not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {name!r}")
    return _FAMILIES[name]


def register_preset(name: str, config: ModelConfig) -> ModelConfig:
    family = _FAMILIES.get(config.family)
    if family is None:
        raise ValueError(f"preset {name!r}: family {config.family!r} is not registered")
    config = dataclasses.replace(config, block=FrozenDict({**family.block_keys, **config.block}), preset=name)
    _check_block(family, config.block)
    _PRESETS[name] = config
    return config


def _check_block(family: Family, block: Mapping[str, Any]) -> None:
    unknown = sorted(set(block) - set(family.block_keys))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for family {family.name!r}; top-level fields are "
            f"{sorted(f.name for f in dataclasses.fields(ModelConfig))}, block options are "
            f"{sorted(family.block_keys)}"
        )


def list_models() -> list[str]:
    """Names of every registered preset."""
    _ensure_loaded()
    return sorted(_PRESETS)


def list_families() -> list[str]:
    _ensure_loaded()
    return sorted(_FAMILIES)


def get_config(name: str, **overrides) -> ModelConfig:
    """The preset's config with ``overrides`` applied (see module docstring)."""
    _ensure_loaded()
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return apply_overrides(_PRESETS[name], **overrides)


def apply_overrides(config: ModelConfig, **overrides) -> ModelConfig:
    family = get_family(overrides.get("family", config.family))
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    top_changes = {k: v for k, v in overrides.items() if k in top}
    block_changes = {k: v for k, v in overrides.items() if k not in top}
    block = dict(top_changes.pop("block", config.block))
    block.update(block_changes)
    _check_block(family, block)
    return dataclasses.replace(config, block=FrozenDict({**family.block_keys, **block}), **top_changes)


def build(config: ModelConfig):
    """The flax module for a config."""
    family = get_family(config.family)
    _check_block(family, config.block)
    if family.make_model is not None:
        return family.make_model(config)
    from .model import SequenceModel

    return SequenceModel(config)


def create(name: str, **overrides):
    """A model from a registered preset, with overrides (top-level fields or block keys)."""
    return build(get_config(name, **overrides))


def _ensure_loaded() -> None:
    from . import presets  # noqa: F401  (registers the built-in families and presets)
