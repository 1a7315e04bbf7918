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
