"""Input checks every op shares: the float arrays an op computes with, and ``resets``.

The ops compute in floating point: an integer array would be computed in integer
arithmetic (truncated results, or zeros), so it is refused with a TypeError naming the
argument instead of being promoted silently. ``resets`` must be a bool array: a float
mask (0.3) would count as True after a cast, so it is refused too.
"""

from __future__ import annotations

import jax.numpy as jnp


def float_array(name: str, value, *, complex_ok: bool = False):
    """``value`` as an array; TypeError naming ``name`` unless its dtype is floating point
    (or complex, where ``complex_ok``: ``linear_scan`` runs S4D's complex recurrences)."""
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.inexact if complex_ok else jnp.floating):
        kinds = "floating-point or complex" if complex_ok else "floating-point"
        raise TypeError(
            f"{name} must be a {kinds} array (float32, bfloat16, ...), got dtype {arr.dtype}: "
            f"cast it first, e.g. {name}.astype(jnp.float32)"
        )
    return arr


def bool_resets(resets, batch: int, time: int):
    """``resets`` as a (batch, time) bool array, or None. ValueError on another shape,
    TypeError on another dtype (True marks the first token of a new episode)."""
    if resets is None:
        return None
    shape = getattr(resets, "shape", None)
    if shape is None or tuple(shape) != (batch, time):
        raise ValueError(f"resets must have shape (batch, time) = {(batch, time)}, got shape {shape}")
    arr = jnp.asarray(resets)
    if arr.dtype != jnp.bool_:
        raise TypeError(
            f"resets must be a bool array (True at the first token of an episode), got dtype {arr.dtype}; "
            "use e.g. resets.astype(bool) if 0/1 values are meant"
        )
    return arr


def state_shapes(state):
    """The shapes of a state tuple's arrays (None if ``state`` is not iterable), for the ops'
    state checks."""
    try:
        return tuple(tuple(jnp.shape(s)) for s in state)
    except TypeError:
        return None
