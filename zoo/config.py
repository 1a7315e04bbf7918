"""Model configuration: one frozen, JSON-serialisable dataclass for every family.

Top-level fields describe the shared scaffold (embedding or input projection,
number of blocks, final norm, head); ``block`` holds the family's own keyword
arguments (heads, state size, ...), validated against the family's allowed keys.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping
from typing import Any

HEADS = ("lm", "classify", "regress")
POOLS = ("last", "mean")
FINAL_NORMS = ("rms", "layer", "layer_nobias", "none")


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
      remat: rematerialise each block in the backward pass.
      scan_layers: run the blocks with ``nn.scan`` (one traced and compiled block for all
        layers, parameters stacked on a leading "layers" axis); needs identical blocks,
        or blocks repeating with a period P dividing n_layers (xLSTM with an sLSTM block
        every P-th): then each scan step runs one group of P blocks, parameters
        ``blocks/block_j`` (j < P) stacked over the n_layers / P groups.
      block: the family's keyword arguments.
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
    scan_layers: bool = False
    block: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
    preset: str | None = None

    def __post_init__(self):
        if not isinstance(self.block, FrozenDict):
            object.__setattr__(self, "block", FrozenDict(self.block))
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
        if self.logit_soft_cap is not None and self.logit_soft_cap <= 0:
            raise ValueError(f"logit_soft_cap must be > 0 or None, got {self.logit_soft_cap}")

    @property
    def outputs(self) -> int:
        """Width of the head's output."""
        return {"lm": self.vocab_size, "classify": self.num_classes, "regress": self.output_dim}[self.head]

    def replace(self, **changes) -> ModelConfig:
        """A copy with top-level fields and/or block keys changed (see ``split_overrides``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block"] = _plain(dict(self.block))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; expected a subset of {sorted(fields)}")
        return cls(**{**d, "block": FrozenDict(_from_json(d.get("block", {})))})


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
