"""Model configuration: one frozen, JSON-serialisable dataclass for every family.

Top-level fields (:class:`ModelConfig`) describe the shared scaffold (embedding or input
projection, number of blocks, final norm, head); ``block`` holds the family's own
options as the family's typed, frozen config dataclass (a :class:`BlockConfig`
subclass, e.g. ``mnemax.families.mamba.MambaConfig``), registered with the family in
:mod:`mnemax.registry`. A plain mapping given as ``block`` is converted to it (unknown
options raise, naming them); the config reads as a mapping too (``config.block["d_state"]``).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping
from typing import Any

from .registry import get_family

HEADS = ("lm", "classify", "regress")
POOLS = ("last", "mean")
FINAL_NORMS = ("rms", "layer", "layer_nobias", "none")
# what a rematerialised block keeps for its backward pass (zoo.model maps each to a JAX policy)
REMAT_POLICIES = ("nothing", "dots", "dots_all")


class FrozenDict(Mapping):
    """A small hashable, immutable mapping (flax module attributes must be hashable)."""

    def __init__(self, *args, **kwargs):
        self._d = dict(*args, **kwargs)

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __hash__(self):
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self._d.items())))

    def __eq__(self, other):
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self):
        return f"FrozenDict({self._d!r})"


def _hashable(v):
    if isinstance(v, list | tuple):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict | Mapping):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


@dataclasses.dataclass(frozen=True)
class BlockConfig(Mapping):
    """Base of the families' block configs: a frozen dataclass of the block's options
    (the fields, with their defaults), also readable as a mapping ``option -> value``.

    Subclasses validate in ``__post_init__`` (calling ``super().__post_init__()`` first,
    which turns lists into tuples so that the config stays hashable), raising ValueError
    that names the field. ``options_for(cls)`` picks the options that are fields of a layer
    class (the block builders pass the config on by name)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, f.name, _tuples(value))

    # -- the mapping view
    def __getitem__(self, key: str):
        if key not in self.option_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.option_names())

    def __len__(self) -> int:
        return len(self.option_names())

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The block options, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{option: default}``: what a block option is when a config does not set it."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{option: value}`` (tuples as lists)."""
        return {name: _plain(getattr(self, name)) for name in self.option_names()}

    def options_for(self, layer_cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """This config's options that are fields of ``layer_cls`` (a flax module class),
        except ``exclude``."""
        names = {f.name for f in dataclasses.fields(layer_cls)} - {"parent", "name", *exclude}
        return {k: getattr(self, k) for k in self.option_names() if k in names}

    # -- validation helpers for subclasses (each raises ValueError naming the field)
    def reject(self, name: str, expected: str) -> None:
        raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r} ({type(self).__name__})")

    def check_int(self, *names: str, low: int = 1, optional: bool = False) -> None:
        for name in names:
            v = getattr(self, name)
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                self.reject(name, f"an integer >= {low}" + (" or None" if optional else ""))

    def check_number(self, *names: str, positive: bool = True, optional: bool = False) -> None:
        for name in names:
            v = getattr(self, name)
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or (v <= 0 if positive else v < 0):
                self.reject(name, ("a number > 0" if positive else "a number >= 0") + (" or None" if optional else ""))

    def check_choice(self, name: str, allowed) -> None:
        if getattr(self, name) not in tuple(allowed):
            self.reject(name, f"one of {tuple(allowed)}")


def _tuples(v):
    if isinstance(v, list | tuple):
        return tuple(_tuples(x) for x in v)
    return v


def unknown_options_error(family_name: str, config_cls: type[BlockConfig], unknown) -> ValueError:
    """The error for block options the family does not have (names them, and every valid name)."""
    return ValueError(
        f"unknown option(s) {sorted(unknown)} for family {family_name!r}; top-level fields are "
        f"{sorted(f.name for f in dataclasses.fields(ModelConfig))}, block options are "
        f"{sorted(config_cls.option_names())}"
    )


def block_from_dict(family_name: str, options: Mapping[str, Any]) -> BlockConfig:
    """The family's typed block config from a mapping of options (JSON lists become tuples);
    options it does not set keep their defaults. Raises ValueError naming unknown options."""
    config_cls = get_family(family_name).config
    if not isinstance(options, Mapping):
        raise TypeError(f"block must be a {config_cls.__name__} or a mapping of its options, got {type(options).__name__}")
    unknown = set(options) - set(config_cls.option_names())
    if unknown:
        raise unknown_options_error(family_name, config_cls, unknown)
    return config_cls(**{k: _from_json(v) for k, v in options.items()})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Configuration of a zoo model: ``embed/input projection -> blocks -> norm -> head``.

    Attributes:
      family: registered family name ("transformer", "mamba", ...).
      d_model: width of the residual stream.
      n_layers: number of blocks.
      vocab_size: token inputs (batch, time) int when set.
      input_dim: continuous inputs (batch, time, input_dim) when set (exclusive with
        ``vocab_size``).
      head: "lm" (next-token logits over ``vocab_size``), "classify" (per-step logits
        over ``num_classes``; read the last step, or a causal running mean with
        ``pool="mean"``), "regress" (per-step outputs of width ``output_dim``).
      tie_embeddings: the LM head reuses the embedding matrix.
      final_norm: "rms", "layer", "layer_nobias" or "none".
      norm_eps: epsilon of the final norm.
      logit_soft_cap: if set, head outputs become ``cap * tanh(out / cap)`` (xLSTM 7B).
      embed_init_std: standard deviation of the embedding init.
      dtype, param_dtype: compute and storage dtypes (names, e.g. "bfloat16").
      remat: rematerialise each block in the backward pass (less memory; on an H100 it also
        made `mamba2-130m`'s and `gdn-125m`'s 2k training step 24% faster, their stored
        residuals costing more to move than to recompute: benchmarks/RESULTS.md).
      remat_policy: what a rematerialised block keeps (with ``remat``): "nothing" (the
        default: the whole block is recomputed in the backward pass), "dots" (the outputs of
        its matmuls without batch dimensions, i.e. the projections, are kept and only the
        rest is recomputed: ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``) or
        "dots_all" (every matmul's output, batched ones too: ``dots_saveable``). Gradients
        are the same under every policy; only memory and speed differ (on an H100 neither
        "dots" nor "dots_all" made the 2k steps of `gdn-125m` or `mamba2-130m` faster than
        "nothing": benchmarks/RESULTS.md, eighth session).
      scan_layers: run the blocks with ``nn.scan`` (one traced and compiled block for all
        layers, parameters stacked on a leading "layers" axis); needs identical blocks,
        or blocks repeating with a period P dividing n_layers (xLSTM with an sLSTM block
        every P-th): then each scan step runs one group of P blocks, parameters
        ``blocks/block_j`` (j < P) stacked over the n_layers / P groups.
      block: the family's options: an instance of the family's config dataclass (a mapping
        of its options is converted; None: the family's defaults).
      preset: the preset this config came from, if any.
    """

    family: str
    d_model: int
    n_layers: int
    vocab_size: int | None = None
    input_dim: int | None = None
    head: str = "lm"
    num_classes: int | None = None
    output_dim: int | None = None
    pool: str = "last"
    tie_embeddings: bool = False
    final_norm: str = "rms"
    norm_eps: float = 1e-6
    logit_soft_cap: float | None = None
    embed_init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "nothing"
    scan_layers: bool = False
    block: BlockConfig | Mapping[str, Any] | None = None
    preset: str | None = None

    def __post_init__(self):
        family = get_family(self.family)  # ValueError naming the registered families
        block = self.block
        if block is None:
            block = family.config()
        elif isinstance(block, BlockConfig):
            if not isinstance(block, family.config):
                raise TypeError(
                    f"block must be a {family.config.__name__} for family {self.family!r}, got {type(block).__name__}"
                )
        else:
            block = block_from_dict(self.family, block)
        object.__setattr__(self, "block", block)
        self.validate()

    def validate(self) -> None:
        if self.d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {self.d_model}")
        if self.n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {self.n_layers}")
        for name in ("vocab_size", "input_dim", "num_classes", "output_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError(
                "exactly one of vocab_size (token inputs) and input_dim (continuous inputs) "
                f"must be set, got vocab_size={self.vocab_size}, input_dim={self.input_dim}"
            )
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "lm" and self.vocab_size is None:
            raise ValueError("head='lm' needs vocab_size (token inputs), got vocab_size=None")
        if self.head == "classify" and not self.num_classes:
            raise ValueError(f"head='classify' needs num_classes >= 1, got {self.num_classes}")
        if self.head == "regress" and not self.output_dim:
            raise ValueError(f"head='regress' needs output_dim >= 1, got {self.output_dim}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.tie_embeddings and (self.head != "lm" or self.vocab_size is None):
            raise ValueError("tie_embeddings=True needs head='lm' with token inputs")
        if self.final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {self.final_norm!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.logit_soft_cap is not None and self.logit_soft_cap <= 0:
            raise ValueError(f"logit_soft_cap must be > 0 or None, got {self.logit_soft_cap}")

    def layer_dtypes(self) -> dict[str, str]:
        """``dtype`` and ``param_dtype``, as the layers take them."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype}

    @property
    def outputs(self) -> int:
        """Width of the head's output."""
        return {"lm": self.vocab_size, "classify": self.num_classes, "regress": self.output_dim}[self.head]

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes`` applied: a name of a top-level field replaces it (``block``
        replaces the whole block), any other name must be one of the family's block options
        (ValueError naming it otherwise). Changing ``family`` re-reads the block's options
        under the new family."""
        top = {f.name for f in dataclasses.fields(ModelConfig)}
        top_changes = {k: v for k, v in changes.items() if k in top}
        block_changes = {k: v for k, v in changes.items() if k not in top}
        block = top_changes.pop("block", self.block)
        family = top_changes.get("family", self.family)
        if block_changes or (family != self.family and isinstance(block, BlockConfig)):
            block = {**(dict(block) if block is not None else {}), **block_changes}
        return dataclasses.replace(self, block=block, **top_changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; ``block`` as ``{option: value}`` with every option of the family."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["block"] = self.block.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The config of :meth:`to_dict`'s output (JSON lists become tuples); block options it
        omits keep the family's defaults. Raises ValueError naming unknown fields or options."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; expected a subset of {sorted(fields)}")
        return cls(**{**d, "block": dict(d.get("block") or {})})


def _plain(v):
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def _from_json(v):
    """JSON lists come back as tuples so that configs stay hashable."""
    if isinstance(v, Mapping):
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return tuple(_from_json(x) for x in v)
    return v
