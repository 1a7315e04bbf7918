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


def chunk_size_int(chunk_size) -> int:
    """``chunk_size`` if a positive int, else ValueError."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def scale_or_default(scale, d_k: int) -> float:
    """The query scale as a float: ``scale``, or ``d_k ** -0.5`` when None."""
    if scale is None:
        return d_k**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None (for d_k ** -0.5), got {type(scale).__name__}")
    return float(scale)


def matrix_state(state, want: tuple):
    """ValueError unless ``state`` is None or has the shape ``want`` (batch, heads, d_k, d_v)."""
    if state is not None and tuple(jnp.shape(state)) != tuple(want):
        raise ValueError(f"state must have shape (batch, heads, d_k, d_v) = {tuple(want)}, got shape {jnp.shape(state)}")


def attention_inputs(q, k, v, g=None, *, grouped: bool = False):
    """``q, k`` (batch, heads, time, d_k), ``v`` (batch, heads, time, d_v) and the log decay
    ``g`` (None, (batch, heads, time) one per head, or (batch, heads, time, d_k) one per key
    channel) as float arrays; ValueError/TypeError naming the argument otherwise. With
    ``grouped``, q and k may have a divisor of v's heads (``heads`` is then v's)."""
    q, k, v = (float_array(n, a) for n, a in (("q", q), ("k", k), ("v", v)))
    if q.ndim != 4:
        raise ValueError(f"q must have shape (batch, heads, time, d_k), got shape {q.shape}")
    if q.shape[2] < 1:
        raise ValueError(f"q must have at least one time step, got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (batch, heads, time, d_k) = {q.shape}, got shape {k.shape}")
    per_head = q.shape[:3]
    if grouped and v.ndim == 4 and v.shape[1] != q.shape[1]:
        if v.shape[1] % q.shape[1]:
            raise ValueError(f"q must have as many heads as v ({v.shape[1]}) or a divisor of them (grouped heads), "
                             f"got shape {q.shape} beside v's {v.shape}")
        per_head = (q.shape[0], v.shape[1], q.shape[2])
    if v.ndim != 4 or v.shape[:3] != per_head:
        raise ValueError(f"v must have shape (batch, heads, time, d_v) = {per_head + ('d_v',)}, got shape {v.shape}")
    if g is not None:
        g = float_array("g", g)
        if g.shape not in (per_head, per_head + q.shape[3:]):
            raise ValueError(
                f"g must have shape (batch, heads, time) = {per_head} (one log decay per head) or "
                f"(batch, heads, time, d_k) = {per_head + q.shape[3:]} (one per key channel), got shape {g.shape}")
    return q, k, v, g
