"""The note pool of MemMamba (:mod:`mnemax.layers.memmamba`): a fixed-size, per-row store of
summaries that a layer writes when a token's salience passes a threshold and that later
tokens (and layers) read by attention. Pure functions on :class:`NotePool`; the module
that runs them is :class:`~mnemax.layers.memmamba.PoolAttention`.

Shapes: pool ``entries`` (batch, P, pool_dim), ``salience`` (batch, P), ``count``
(batch,) int32; a note stream (:class:`Notes`) holds per-token ``values`` (batch, time,
pool_dim), ``salience`` and ``write`` (batch, time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .base import reset_state


class NotePool(NamedTuple):
    entries: jax.Array  # (batch, P, pool_dim) stored summaries
    salience: jax.Array  # (batch, P) their scores
    count: jax.Array  # (batch,) int32: notes written in this episode (valid slots: min(count, P))


class Notes(NamedTuple):
    """A layer's note stream: what each token offers the pool."""

    values: jax.Array  # (batch, time, pool_dim) summaries (times the note gate)
    salience: jax.Array  # (batch, time) scores in (0, 1)
    write: jax.Array  # (batch, time) bool: score > note_threshold


def empty_pool(batch: int, size: int, width: int, dtype=jnp.float32) -> NotePool:
    return NotePool(
        jnp.zeros((batch, size, width), dtype), jnp.zeros((batch, size), dtype), jnp.zeros((batch,), jnp.int32)
    )


def pool_valid(pool: NotePool) -> jax.Array:
    """(batch, P) bool: the slots that hold a note."""
    size = pool.salience.shape[1]
    return jnp.arange(size)[None, :] < jnp.minimum(pool.count, size)[:, None]


def gate(score, threshold: float, kind: str, temperature: float):
    """The hard / soft / straight-through gate of ``score > threshold``."""
    hard = (score > threshold).astype(score.dtype)
    if kind == "hard":
        return hard
    soft = jax.nn.sigmoid((score - threshold) / temperature)
    if kind == "soft":
        return soft
    return hard + soft - lax.stop_gradient(soft)


# ----------------------------------------------------------------------------- pool updates


def insert_note(pool: NotePool, value, salience, write, replace: str) -> NotePool:
    """The reference rule for one token: value (batch, W), salience/write (batch,)."""
    size = pool.salience.shape[1]
    slots = jnp.arange(size)[None, :]
    n = pool.count
    if replace == "oldest":
        slot, do = n % size, write
    else:
        full = n >= size
        weakest = jnp.argmin(pool.salience, axis=1)  # a full pool has only valid slots
        lowest = jnp.take_along_axis(pool.salience, weakest[:, None], axis=1)[:, 0]
        slot = jnp.where(full, weakest, n)
        do = write & (~full | (salience > lowest))
    hit = do[:, None] & (slots == slot[:, None])
    return NotePool(
        jnp.where(hit[..., None], value[:, None, :].astype(pool.entries.dtype), pool.entries),
        jnp.where(hit, salience[:, None].astype(pool.salience.dtype), pool.salience),
        n + write.astype(jnp.int32),
    )


def merge_notes(pool: NotePool, values, salience, write, replace: str) -> NotePool:
    """Writes a chunk's notes at once: values (batch, C, W), salience/write (batch, C).

    "oldest": the chunk's k-th note goes to slot (count + k) mod P (only the last P
    survive). "salience": the P best of (valid entries, written notes) by salience stay
    -- ties rank old entries above new ones, a higher slot above a lower one and an
    earlier note above a later one, which is the order the reference's one-at-a-time
    rule produces -- and the kept notes fill the freed slots in ascending order. Slots
    are assigned with a one-hot (batch, C, P) matrix, so gradients reach the values.
    """
    size, chunk = pool.salience.shape[1], salience.shape[1]
    n = pool.count
    if replace == "oldest":
        rank = jnp.cumsum(write, axis=1) - 1
        total = jnp.sum(write, axis=1)
        keep = write & (rank >= (total - size)[:, None])
        slot = (n[:, None] + rank) % size
        assign = keep[..., None] & (slot[..., None] == jnp.arange(size))
    else:
        key = jnp.concatenate([pool.salience, salience.astype(pool.salience.dtype)], axis=1)
        tie = jnp.concatenate([jnp.arange(size), -1 - jnp.arange(chunk)])
        cand = jnp.concatenate([pool_valid(pool), write], axis=1)
        ka, kc = key[:, :, None], key[:, None, :]
        above = cand[:, :, None] & ((ka > kc) | ((ka == kc) & (tie[:, None] > tie[None, :])))
        keep = cand & (jnp.sum(above, axis=1) < size)
        keep_old, keep_new = keep[:, :size], keep[:, size:]
        free = ~keep_old
        free_rank = jnp.cumsum(free, axis=1) - 1
        new_rank = jnp.cumsum(keep_new, axis=1) - 1
        assign = keep_new[..., None] & free[:, None, :] & (new_rank[..., None] == free_rank[:, None, :])
    written = jnp.any(assign, axis=1)
    onehot = assign.astype(pool.entries.dtype)
    new_values = jnp.einsum("bcp,bcw->bpw", onehot, values.astype(pool.entries.dtype))
    new_salience = jnp.einsum("bcp,bc->bp", onehot, salience.astype(pool.salience.dtype))
    return NotePool(
        jnp.where(written[..., None], new_values, pool.entries),
        jnp.where(written, new_salience, pool.salience),
        n + jnp.sum(write, axis=1).astype(jnp.int32),
    )


# ----------------------------------------------------------------------------- reading


def attend(q, pools: Sequence[NotePool], visible, w_k, w_v):
    """Multi-head attention from queries q (batch, C, H, D) to the valid entries of the
    pools (concatenated), for the tokens where ``visible`` (batch, C) is True; a token
    that sees no entry gets exactly zero. Returns (batch, C, H, D)."""
    entries = jnp.concatenate([p.entries for p in pools], axis=1).astype(q.dtype)
    valid = jnp.concatenate([pool_valid(p) for p in pools], axis=1)
    k = jnp.einsum("bpw,whd->bphd", entries, w_k.astype(q.dtype))
    v = jnp.einsum("bpw,whd->bphd", entries, w_v.astype(q.dtype))
    logits = jnp.einsum("bchd,bphd->bhcp", q, k) / math.sqrt(q.shape[-1])
    mask = valid[:, None, None, :] & visible[:, None, :, None]
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1) * mask
    return jnp.einsum("bhcp,bphd->bchd", probs, v)


def _clear(pool: NotePool, mask) -> NotePool:
    return reset_state(pool, mask)


def scan_reference(pools0, notes, resets, q, w_k, w_v, replace: str):
    """Token by token: clear on reset, read the pools, then insert each pool's note.
    q: (batch, T, H, D); returns (reads (batch, T, H, D), final pools)."""
    batch, time = q.shape[:2]
    cut = jnp.zeros((batch, time), bool) if resets is None else resets
    xs = (q, cut, tuple(tuple(n) for n in notes))
    xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)

    def step(pools, inp):
        q_t, cut_t, notes_t = inp
        pools = tuple(_clear(p, cut_t) for p in pools)
        read = attend(q_t[:, None], pools, jnp.ones((batch, 1), bool), w_k, w_v)[:, 0]
        pools = tuple(insert_note(p, v, s, w, replace) for p, (v, s, w) in zip(pools, notes_t))
        return pools, read

    pools, reads = lax.scan(step, tuple(pools0), xs)
    return jnp.moveaxis(reads, 0, 1), pools


def chunk_split(batch: int, time: int, chunk: int):
    """(size, n_chunks, split): ``split`` maps (batch, time, ...) to (n_chunks, batch, size,
    ...), zero-padding the last chunk."""
    size = min(chunk, time)
    n_chunks = -(-time // size)
    pad = n_chunks * size - time

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((batch, n_chunks, size) + a.shape[2:]), 1, 0)

    return size, n_chunks, split


def scan_chunked(pools0, notes, resets, q, w_k, w_v, replace: str, chunk: int, history: bool = False):
    """Chunk by chunk (see the module docstring); equals :func:`scan_reference` at chunk 1.
    Returns (reads, final pools) and, with ``history``, the pools at each chunk's start
    (each a :class:`NotePool` with a leading (n_chunks,) axis)."""
    batch, time = q.shape[:2]
    size, n_chunks, split = chunk_split(batch, time, chunk)  # padded steps write nothing
    cut = jnp.zeros((batch, time), bool) if resets is None else resets
    xs = jax.tree.map(split, (q, cut, tuple(tuple(n) for n in notes)))
    steps = jnp.arange(size)

    @jax.checkpoint
    def body(pools, inp):
        q_c, cut_c, notes_c = inp
        visible = jnp.cumsum(cut_c, axis=1) == 0  # no reset between the chunk start and the token
        read = attend(q_c, pools, visible, w_k, w_v)
        last = jnp.max(jnp.where(cut_c, steps, -1), axis=1)  # the chunk's last reset, or -1
        new = []
        for pool, (v, s, w) in zip(pools, notes_c):
            pool = _clear(pool, last >= 0)
            new.append(merge_notes(pool, v, s, w & (steps[None, :] >= last[:, None]), replace))
        return tuple(new), ((read, pools) if history else read)

    pools, out = lax.scan(body, tuple(pools0), xs)
    reads = out[0] if history else out
    reads = jnp.moveaxis(reads, 0, 1).reshape((batch, n_chunks * size) + reads.shape[3:])[:, :time]
    return (reads, pools, out[1]) if history else (reads, pools)


def read_history(q, history: Sequence[NotePool], resets, w_k, w_v, chunk: int):
    """The reads of :func:`scan_chunked` from pools recorded at each chunk's start
    (``history``: NotePools with a leading (n_chunks,) axis, as ``scan_chunked(...,
    history=True)`` returns them for the same time and chunk), all chunks at once."""
    batch, time = q.shape[:2]
    size, n_chunks, split = chunk_split(batch, time, chunk)
    for h in history:
        if h.count.shape[0] != n_chunks:
            raise ValueError(f"history must hold the pools of {n_chunks} chunks of {size} steps, got {h.count.shape[0]}")
    cut = jnp.zeros((batch, time), bool) if resets is None else resets
    q_c, cut_c = split(q), split(cut)
    visible = jnp.cumsum(cut_c, axis=2) == 0  # no reset between the chunk start and the token

    @jax.checkpoint
    def one(q, visible, pools):
        return attend(q, pools, visible, w_k, w_v)

    reads = jax.vmap(one)(q_c, visible, tuple(history))
    return jnp.moveaxis(reads, 0, 1).reshape((batch, n_chunks * size) + reads.shape[3:])[:, :time]
