"""What every converter needs: array conversion, config lookup, and the check that a
converted tree has exactly the mnemax module's structure and shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def to_numpy(value) -> np.ndarray:
    """A float32 numpy copy of an array-like (torch tensors via ``.detach().cpu()``)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if "bfloat16" in str(value.dtype) or "float16" in str(value.dtype):
            value = value.float()
        value = value.numpy()
    return np.asarray(value, np.float32)


def cfg_get(cfg, key: str, default=None):
    """``cfg[key]`` for a mapping, ``cfg.key`` for an object; ``default`` when absent."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def check_tree_matches(params: Mapping[str, Any], want: Mapping[str, Any], what: str) -> None:
    """Raises ValueError unless ``params`` has exactly the paths and shapes of ``want``
    (a tree of arrays or ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape`` of ``init``)."""
    want_paths = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(want)}
    got_paths = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if want_paths != got_paths:
        missing = sorted(set(want_paths) - set(got_paths))
        extra = sorted(set(got_paths) - set(want_paths))
        shapes = sorted(
            (k, got_paths[k], want_paths[k]) for k in set(want_paths) & set(got_paths) if got_paths[k] != want_paths[k]
        )
        raise ValueError(
            f"converted parameters do not match {what}: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"shape mismatches (path, got, want) {shapes[:5]}"
        )


def model_param_shapes(config) -> dict:
    """The parameter tree of ``mnemax.build(config)`` as shapes (nothing allocated)."""
    from flax import linen as nn

    from ..registry import build

    want = jax.eval_shape(build(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    return nn.meta.unbox(want)


def family_block_defaults(family: str) -> dict:
    """The default block options of a registered family (its typed config's fields)."""
    from ..registry import get_family

    return dict(get_family(family).block_keys)


class StateDict:
    """A checkpoint's arrays read by name: ``take(key)`` returns a float32 numpy copy and
    remembers the key, so :meth:`check_all_read` can refuse keys a converter left unmapped."""

    def __init__(self, arrays: Mapping[str, Any]):
        self.arrays, self.read = dict(arrays), set()

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def take(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise ValueError(f"state_dict is missing {key!r} (have e.g. {sorted(self.arrays)[:6]})")
        self.read.add(key)
        return to_numpy(self.arrays[key])

    def check_all_read(self) -> None:
        leftover = sorted(set(self.arrays) - self.read)
        if leftover:
            raise ValueError(f"state_dict has keys this converter does not map: {leftover[:8]}")


def hf_backbone(state_dict: Mapping[str, Any], tie_embeddings: bool) -> StateDict:
    """An HF ``*ForCausalLM`` (``backbone.`` prefixes, ``lm_head``) or bare ``*Model``
    state_dict with the prefixes dropped and ``embedding``/``embeddings`` as
    ``embeddings.weight``; ValueError when an untied model has no ``lm_head.weight``."""
    sd = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
    if "embedding.weight" in sd and "embeddings.weight" not in sd:
        sd["embeddings.weight"] = sd.pop("embedding.weight")
    if "lm_head.weight" not in sd and not tie_embeddings:
        raise ValueError("state_dict has no lm_head.weight but hf_config.tie_word_embeddings is False")
    return StateDict(sd)


def finish_hf_lm(sd: StateDict, config, params: dict) -> tuple[Any, dict]:
    """Adds the final norm and the LM head (or, tied, accounts for HF's copy of the
    embedding) to ``params``, refuses unread keys and shapes unlike the model's, and returns
    ``(config, {"params": ...})`` as jax arrays."""
    params["final_norm"] = {"scale": sd.take("norm_f.weight")}
    if not config.tie_embeddings:
        params["head"] = {"kernel": sd.take("lm_head.weight").T}
    elif "lm_head.weight" in sd:
        sd.read.add("lm_head.weight")  # tied: the same matrix as the embedding
    sd.check_all_read()
    check_tree_matches(params, model_param_shapes(config), "the mnemax model for this config")
    return config, {"params": jax.tree.map(jnp.asarray, params)}
