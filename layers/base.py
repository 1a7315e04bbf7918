"""Shared helpers for the layer contract.

Every sequence mixer in :mod:`mnemax.layers` is called as::

    y, state = layer(x, state=None, resets=None)   # x: (batch, time, features)
    state0 = layer.initial_state(batch_size)        # on the unbound module

``state=None`` is a fresh memory; ``resets`` (batch, time) bool clears the memory
before the tokens where it is True. States are pytrees of float32 arrays (float64
when the layer computes in float64). Stateless pieces (norms, MLPs) follow the same
contract with the empty state ``()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


def state_dtype(dtype: Dtype | None) -> jnp.dtype:
    """States are float32 unless the layer computes in float64 (tests)."""
    if dtype is not None and jnp.dtype(dtype) == jnp.float64:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def compute_dtype(dtype: Dtype | None, *arrays) -> jnp.dtype:
    """The explicit compute dtype, else the promoted dtype of the inputs (at least float32
    for integer inputs)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    dt = jnp.result_type(*arrays)
    if not jnp.issubdtype(dt, jnp.inexact):
        dt = jnp.float32
    return jnp.dtype(dt)


def partitioned(init: Initializer, names: tuple[str | None, ...]) -> Initializer:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def check_sequence(x, features: int | None = None, name: str = "x") -> None:
    """x must be (batch, time, features)."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3:
        want = f"(batch, time, {features})" if features else "(batch, time, features)"
        raise ValueError(f"{name} must have shape {want}, got shape {shape}")
    if features is not None and shape[-1] != features:
        raise ValueError(
            f"{name} must have shape (batch, time, {features}), got shape {tuple(shape)}"
        )


def check_resets(resets, batch: int, time: int):
    """Returns resets as a (batch, time) bool array (or None); ValueError on a bad shape."""
    if resets is None:
        return None
    shape = getattr(resets, "shape", None)
    if shape != (batch, time):
        raise ValueError(
            f"resets must have shape (batch, time) = {(batch, time)}, got shape {shape}"
        )
    return jnp.asarray(resets).astype(bool)


def check_state(state, expected, name: str = "state") -> None:
    """Compares a state pytree with the expected one (shapes and structure)."""
    exp_leaves, exp_tree = jax.tree.flatten(expected)
    try:
        leaves, tree = jax.tree.flatten(state)
    except Exception as err:  # pragma: no cover - flatten of odd objects
        raise ValueError(f"{name} is not a pytree: {err}") from None
    if tree != exp_tree:
        raise ValueError(f"{name} must have structure {exp_tree}, got {tree}")
    for got, want in zip(leaves, exp_leaves):
        if tuple(jnp.shape(got)) != tuple(want.shape):
            raise ValueError(
                f"{name} leaf shapes must be {[tuple(l.shape) for l in exp_leaves]}, "
                f"got {[tuple(jnp.shape(l)) for l in leaves]} "
                "(was it made for another batch size or layer config?)"
            )


def expected_state(module, batch: int):
    """Shapes of ``module.initial_state(batch)`` without allocating."""
    return jax.eval_shape(lambda: module.initial_state(batch))


def begin_call(module, x, state, resets, features: int | None = None, name: str = "x"):
    """The checks every contract call starts with: ``x`` is (batch, time, features),
    ``resets`` (batch, time), ``state`` None (-> ``module.initial_state(batch)``) or shaped
    like it. Returns (state, resets as bool or None)."""
    check_sequence(x, features, name=name)
    batch, time = x.shape[:2]
    resets = check_resets(resets, batch, time)
    if state is None:
        return module.initial_state(batch), resets
    check_state(state, expected_state(module, batch))
    return state, resets


def segment_ids(resets, batch: int, time: int):
    """(batch, time) int32: number of resets up to and including each step."""
    if resets is None:
        return jnp.zeros((batch, time), jnp.int32)
    return jnp.cumsum(resets.astype(jnp.int32), axis=1)


def reset_state(state, mask):
    """Zeroes every leaf of ``state`` for the batch rows where ``mask`` (batch,) is True."""

    def f(leaf):
        m = mask.reshape((-1,) + (1,) * (leaf.ndim - 1))
        return jnp.where(m, jnp.zeros_like(leaf), leaf)

    return jax.tree.map(f, state)


class Stateless(nn.Module):
    """Base for pieces without memory: the contract with the empty state ``()``."""

    def initial_state(self, batch_size: int):  # noqa: D401 - contract method
        del batch_size
        return ()

    def _check_call(self, x, state, resets):
        check_sequence(x)
        if state is not None and jax.tree.leaves(state):
            raise ValueError(f"state must be () or None for {type(self).__name__}, got {state!r}")
        check_resets(resets, x.shape[0], x.shape[1])
