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
import numpy as np

from mnemax.kernels.checks import bool_resets

Dtype = Any
Initializer = Callable[..., jax.Array]

# Parameters that are not weights, by leaf name: the state-space dynamics and gate biases.
NO_WEIGHT_DECAY = frozenset({
    "A_log",  # Mamba / MemMamba: the reference marks A_log (and D) ``_no_weight_decay``
    "log_A_real", "A_imag",  # S4D: the S4 code registers A, B and dt with weight decay 0
    "A", "B", "log_dt",  # LSSL's state matrices and step (the same S4 convention)
    "dt_bias",  # Mamba's dt_proj bias
    "bias",  # any bias, including sLSTM's (4, heads, head_dim) gate bias
})


def weight_decay_mask(params, no_decay=NO_WEIGHT_DECAY):
    """The AdamW decay mask of a parameter tree: True for weight matrices and embeddings
    (``ndim >= 2``), False for vectors (norm scales, biases, skips) and for the names in
    :data:`NO_WEIGHT_DECAY` whatever their rank (Mamba's ``A_log`` is (E, N), S4D's
    ``log_A_real`` (H, modes), sLSTM's gate ``bias`` (4, heads, head_dim)), following the
    reference implementations. ``params``: a (possibly nested) dict of arrays, as
    ``model.init(...)["params"]``; returns the same tree of Python bools, ready for
    ``optax.adamw(..., mask=weight_decay_mask)``. ``no_decay``: the excluded names
    (``frozenset()``: the rank rule alone)."""

    def decays(path, p):
        # the last dict key names the parameter (boxes such as nn.Partitioned add attribute keys)
        name = next((k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)), None)
        return bool(jnp.ndim(p) >= 2 and name not in no_decay)

    return jax.tree_util.tree_map_with_path(decays, params)


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
    """x must be (batch, time, features) with batch, time >= 1."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3:
        want = f"(batch, time, {features})" if features else "(batch, time, features)"
        raise ValueError(f"{name} must have shape {want}, got shape {shape}")
    if features is not None and shape[-1] != features:
        raise ValueError(
            f"{name} must have shape (batch, time, {features}), got shape {tuple(shape)}"
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one time step, got shape {tuple(shape)}")


def check_resets(resets, batch: int, time: int):
    """Returns resets as a (batch, time) bool array (or None); ValueError on a bad shape,
    TypeError unless its dtype is bool (a float 0.3 must not count as True)."""
    return bool_resets(resets, batch, time)


def check_token_ids(tokens, vocab_size: int, name: str = "inputs") -> None:
    """Token ids must lie in [0, vocab_size): an id past the table gives NaN logits (at earlier
    steps too, through the sequence mixers) and -1 silently reads the last row. Checked
    wherever ``tokens`` is concrete (eager calls, the data pipeline); under ``jit`` it is a
    tracer and the caller's concrete inputs are checked instead."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = np.argwhere((arr < 0) | (arr >= vocab_size))[0]
        raise ValueError(
            f"{name} must be token ids in [0, vocab_size={vocab_size}), got {int(arr[tuple(bad)])} at index "
            f"{tuple(int(i) for i in bad)} (min {lo}, max {hi})"
        )


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


def begin_call(module, x, features: int | None, state, resets):
    """The first steps of a contract layer's call: checks ``x`` (batch, time, features),
    ``resets`` and ``state`` (against ``module.initial_state``). Returns ``(batch, time,
    resets, state, fresh)`` with a fresh initial state when ``state`` is None."""
    check_sequence(x, features)
    batch, time = x.shape[:2]
    resets = check_resets(resets, batch, time)
    fresh = state is None
    if fresh:
        state = module.initial_state(batch)
    else:
        check_state(state, expected_state(module, batch))
    return batch, time, resets, state, fresh


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
