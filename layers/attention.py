"""Causal multi-head self-attention with a KV-cache state.

``y = W_o softmax(q k^T / sqrt(d_head) + mask) v`` with rotary positions (RoPE,
Su et al. 2021) and optional grouped-query heads (``num_kv_heads < num_heads``).

The state is a ring buffer of the last ``window`` keys and values, so attention
reaches back ``window`` tokens (``window`` = the KV-cache size). A full-sequence
call applies the same limit, which keeps one call, a call in pieces and token-by-
token generation identical. Positions count from the start of the current episode
and a reset empties the cache, so after a reset both the outputs and the state are
exactly those of a fresh sequence.

Shapes::

    y, state = CausalSelfAttention(features=F, num_heads=H, window=S)(x, state, resets)
    x, y: (batch, time, F)
    state: AttentionState(
        k, v:      (batch, S, num_kv_heads, head_dim) float32   cached keys/values (rotated)
        slot_pos:  (batch, S) int32   episode position of each slot's entry, -1 if empty
        pos:       (batch,) int32     episode position of the next token
        key_conv:  ConvState of the key-path conv, or () when key_conv == 0)

``key_conv > 0`` adds a causal depthwise conv of that width on the key path only
(the "shift" of H3, Fu et al. 2023, and Based, Arora et al. 2024): each key then also
sees the few tokens before it, so one attention layer can bind a value to the token
that preceded it (associative recall) without first learning a previous-token head.

One call over T tokens scores every query against the S cached slots and the T call
tokens: (T, S + T) scores per head. When T > S + ``query_block`` (default 256; None:
always dense) the queries go in blocks of c = ``query_block`` tokens, one block after
another (a ``lax.fori_loop`` whose body is rematerialised in the backward pass). Block
[b c, b c + c) is scored only against the keys its window can reach, the tokens
[b c - S + 1, b c + c): a slice of :func:`key_timeline`, the call's keys after the
cache's entries in time order, so the first blocks reach into the cache. The masks are
the dense path's (:func:`window_mask`: episode segment, position, causality, window),
so the numbers are the same -- the keys left out are ones the window masks. Only one
block's (c, S - 1 + c) scores per head are live at a time (:func:`block_attention`,
laid out so that XLA keeps one score buffer), and memory grows linearly with T. One
layer of the MQAR Transformer (F = 64, 2 heads, S = 128, key_conv 4) at batch 256,
float32, compiled for the CPU: 1.1 GB of temporaries for the forward pass at T = 4096
and 2.2 GB at T = 8192, against 69 GB and 275 GB dense. The whole 2-layer model at
T = 4096 on an H100: 1.5 GB (2.3 GB with c = 512) against 69 GB dense, and 3x faster
than dense at batch 16. c trades memory and wasted scores (a query needs S keys but its
block scores S - 1 + c) against the number of sequential blocks.

The dense attention runs through ``jax.nn.dot_product_attention`` (``implementation``
picks ``'xla'``/``'cudnn'``; the query blocks use it only for ``'cudnn'``). That
function computes its softmax in float32, so a float64 layer (gradient checks) takes
an exact einsum path instead; :func:`block_attention` computes in float32 or wider.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .conv import CausalConv1d, ConvState
from .base import (
    Dtype,
    check_resets,
    check_sequence,
    check_state,
    compute_dtype,
    expected_state,
    partitioned,
    state_dtype,
)


class AttentionState(NamedTuple):
    k: jax.Array
    v: jax.Array
    slot_pos: jax.Array
    pos: jax.Array
    key_conv: ConvState | tuple = ()


def rope(x, positions, base: float = 10000.0):
    """Rotary embedding (rotate-half layout). x: (batch, time, heads, d); positions: (batch, time)."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim must be even for rotary positions, got {d}")
    dt = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=dt) / d))
    angles = positions.astype(dt)[..., None] * inv_freq  # (batch, time, d/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(dt), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _einsum_attention(q, k, v, mask, scale):
    """Exact attention in the inputs' dtype (used for float64). q: (B,T,H,D), k/v: (B,S,K,D)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


class CausalSelfAttention(nn.Module):
    """Causal MHA over the last ``window`` tokens, with a KV-cache state (see module doc)."""

    features: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    window: int = 1024
    use_rope: bool = True
    rope_base: float = 10000.0
    use_bias: bool = False
    key_conv: int = 0
    implementation: str | None = None
    query_block: int | None = 256
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    out_init: nn.initializers.Initializer | None = None

    @property
    def _kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def _head_dim(self) -> int:
        return self.head_dim or self.features // self.num_heads

    def _check_config(self):
        if self.num_heads < 1 or self._kv_heads < 1 or self.num_heads % self._kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a positive multiple of num_kv_heads ({self._kv_heads})"
            )
        if self.head_dim is None and self.features % self.num_heads:
            raise ValueError(
                f"features ({self.features}) must be divisible by num_heads ({self.num_heads}) "
                "unless head_dim is given"
            )
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.key_conv < 0:
            raise ValueError(f"key_conv must be >= 0 (0: no conv), got {self.key_conv}")
        if self.query_block is not None and (not isinstance(self.query_block, int) or self.query_block < 1):
            raise ValueError(f"query_block must be a positive integer or None (dense), got {self.query_block!r}")

    def initial_state(self, batch_size: int) -> AttentionState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        shape = (batch_size, self.window, self._kv_heads, self._head_dim)
        return AttentionState(
            k=jnp.zeros(shape, sdt),
            v=jnp.zeros(shape, sdt),
            slot_pos=jnp.full((batch_size, self.window), -1, jnp.int32),
            pos=jnp.zeros((batch_size,), jnp.int32),
            key_conv=self._key_conv(parent=None).initial_state(batch_size) if self.key_conv else (),
        )

    def _key_conv(self, **kw) -> CausalConv1d:
        return CausalConv1d(features=self.features, width=self.key_conv, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

    @nn.compact
    def __call__(self, x, state: AttentionState | None = None, resets=None):
        self._check_config()
        check_sequence(x, self.features)
        batch, time, _ = x.shape
        resets = check_resets(resets, batch, time)
        fresh = state is None
        if fresh:
            state = self.initial_state(batch)
        else:
            check_state(state, expected_state(self, batch))
        dt = compute_dtype(self.dtype, x)
        heads, kv_heads, hd, window = self.num_heads, self._kv_heads, self._head_dim, self.window

        def proj(n, name):
            return nn.DenseGeneral(
                (n, hd),
                use_bias=self.use_bias,
                dtype=dt,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(self.kernel_init, ("embed", "heads", "head_dim")),
                bias_init=partitioned(nn.initializers.zeros, ("heads", "head_dim")),
                name=name,
            )

        q = proj(heads, "query")(x)
        key_conv_state = ()
        if self.key_conv:
            xk, key_conv_state = self._key_conv(name="key_conv")(x, state.key_conv, resets)
            k = proj(kv_heads, "key")(xk)
        else:
            k = proj(kv_heads, "key")(x)
        v = proj(kv_heads, "value")(x)

        seg, positions = episode_positions(state.pos, resets, batch, time)
        if self.use_rope:
            q = rope(q, positions, self.rope_base)
            k = rope(k, positions, self.rope_base)

        scale = 1.0 / jnp.sqrt(jnp.asarray(hd, dt))

        def attend(q, keys, values, mask):  # mask: (batch, time, keys)
            if jnp.dtype(dt) == jnp.float64:
                return _einsum_attention(q, keys, values, mask[:, None], scale)
            return jax.nn.dot_product_attention(
                q, keys, values, mask=mask[:, None], scale=float(1.0 / hd**0.5),
                implementation=self.implementation,
            )

        if self.query_block is not None and time > window + self.query_block:
            out = self._blocked_attention(attend, state, q, k, v, positions, seg)
        else:
            keys, values, key_pos, key_seg = with_cache(state, k, v, positions, seg, fresh)
            if jnp.dtype(dt) != jnp.float64 and fresh and resets is None and time <= window:
                out = jax.nn.dot_product_attention(
                    q, keys, values, scale=float(1.0 / hd**0.5), is_causal=True,
                    implementation=self.implementation,
                )
            else:
                out = attend(q, keys, values, window_mask(positions, seg, key_pos, key_seg, window))
        y = nn.DenseGeneral(
            self.features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=dt,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(self.out_init or self.kernel_init, ("heads", "head_dim", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="out",
        )(out)
        return y, self._update_cache(state, k, v, positions, seg)._replace(key_conv=key_conv_state)

    def _update_cache(self, state: AttentionState, k, v, positions, seg) -> AttentionState:
        return ring_buffer_update(state, k, v, positions, seg, self.window)

    def _blocked_attention(self, attend, state: AttentionState, q, k, v, positions, seg):
        """The attention in query blocks (module docstring), one block after another: the
        block of call steps [b c, b c + c) against the key time line's entries [b c, b c +
        S - 1 + c), i.e. the call steps [b c - S + 1, b c + c) with the cache before step 0.
        The queries are padded to whole blocks (padded queries match no key) and each block's
        output overwrites its queries in the loop carry, so the loop holds one (batch, time)
        buffer besides the keys and one block's scores."""
        batch, time = positions.shape
        c, reach = self.query_block, self.window - 1
        nb = -(-time // c)
        pad = nb * c - time  # the last block's key slice stays in range
        keys, values, key_pos, key_seg = key_timeline(state, k, v, positions, seg, reach, pad)

        def padded(a, fill):
            return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)

        q_pos, q_seg = padded(positions, 0), padded(seg, -2)  # segment -2: padded queries see no key
        if self.implementation == "cudnn":
            block_attend = attend
        else:
            scale = 1.0 / float(self._head_dim) ** 0.5

            def block_attend(qb, kb, vb, mask):
                return block_attention(qb, kb, vb, mask, scale)

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def block(qb, start):
            def take(a, n, at):
                return jax.lax.dynamic_slice_in_dim(a, at, n, axis=1)

            n = reach + c
            mask = window_mask(take(q_pos, c, start), take(q_seg, c, start), take(key_pos, n, start),
                               take(key_seg, n, start), self.window)
            return block_attend(qb, take(keys, n, start), take(values, n, start), mask).astype(qb.dtype)

        def step(b, out):
            start = b * c
            qb = jax.lax.dynamic_slice_in_dim(out, start, c, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(out, block(qb, start), start, axis=1)

        return jax.lax.fori_loop(0, nb, step, padded(q, 0))[:, :time]


def block_attention(q, k, v, mask, scale: float):
    """Softmax attention of one block of queries with a boolean mask, in the layouts XLA's
    batched dot takes without copies (one (batch, heads, queries, keys) score buffer).

    q: (batch, queries, heads, d); k, v: (batch, keys, kv_heads, d) (``heads`` a multiple
    of ``kv_heads``: grouped-query heads share keys); mask: (batch, queries, keys), a row
    with no True key gives the mean of the values. Logits and softmax are float32 (or the
    inputs' dtype when wider); the output has q's dtype.
    """
    batch, nq, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qh = jnp.transpose(q.reshape(batch, nq, kv_heads, group, d), (0, 2, 3, 1, 4))
    qh = qh.reshape(batch, kv_heads, group * nq, d)  # (batch, kv_heads, group * queries, d)
    kh = jnp.transpose(k, (0, 2, 1, 3))  # (batch, kv_heads, keys, d)
    vh = jnp.transpose(v, (0, 2, 1, 3))
    batched = ((0, 1), (0, 1))
    # (batch, kv_heads, group * queries, keys)
    logits = jax.lax.dot_general(qh, kh, (((3,), (3,)), batched), preferred_element_type=acc)
    mask = jnp.broadcast_to(mask[:, None, None], (batch, kv_heads, group) + mask.shape[1:]).reshape(logits.shape)
    logits = jnp.where(mask, logits * scale, jnp.asarray(-1e30, acc))  # same shape: XLA can write it in place
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jax.lax.dot_general(e.astype(v.dtype), vh, (((3,), (2,)), batched), preferred_element_type=acc)
    out = out / jnp.sum(e, axis=-1, keepdims=True)  # (batch, kv_heads, group * queries, d)
    out = jnp.transpose(out.reshape(batch, kv_heads, group, nq, d), (0, 3, 1, 2, 4))
    return out.reshape(batch, nq, heads, d).astype(q.dtype)


def window_mask(q_pos, q_seg, key_pos, key_seg, window: int):
    """(batch, queries, keys) bool: True where the query (episode position ``q_pos``, segment
    ``q_seg``, both (batch, queries)) attends to the key (``key_pos``/``key_seg``, (batch,
    keys); position -1: empty): same episode segment, not later, fewer than ``window``
    steps back."""
    qp, kp = q_pos[:, :, None], key_pos[:, None, :]
    return (q_seg[:, :, None] == key_seg[:, None, :]) & (kp >= 0) & (kp <= qp) & (qp - kp < window)


def key_timeline(state: AttentionState, k, v, positions, seg, history: int, pad: int = 0):
    """The keys/values of a call on one time line: the cache's last ``history`` entries in
    time order, the call's T steps, then ``pad`` empty entries. Returns ``(keys, values,
    key_pos, key_seg)`` with ``history + T + pad`` entries on axis 1 (the cache is segment
    0, empty entries have position -1 and segment -1), so call step t sits at index
    ``history + t`` and the ``history`` entries before it are the ones up to ``history``
    steps back: a query block of steps [s, s + c) whose window reaches ``history`` steps
    back needs only the slice [s, s + history + c).

    The cache is read as :func:`ring_buffer_update` writes it: with ``state.pos`` = p, slot
    ``(p - j) % S`` holds the entry j steps before the call (or is empty), so ``history``
    may be at most the number of slots S.
    """
    slots = state.slot_pos.shape[1]
    if not 0 <= history <= slots:
        raise ValueError(f"history must be in [0, {slots}] (the cache's slots), got {history}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    batch = positions.shape[0]
    order = (state.pos[:, None] - history + jnp.arange(history, dtype=jnp.int32)[None, :]) % slots  # (batch, history)

    def line(cached, call, fill):
        cached = jnp.take_along_axis(cached, order.reshape(order.shape + (1,) * (cached.ndim - 2)), axis=1)
        tail = jnp.full((batch, pad) + call.shape[2:], fill, call.dtype)
        return jnp.concatenate([cached.astype(call.dtype), call, tail], axis=1)

    return (
        line(state.k, k, 0),
        line(state.v, v, 0),
        line(state.slot_pos, positions, -1),
        line(jnp.zeros_like(state.slot_pos), seg, -1),
    )


def with_cache(state: AttentionState, k, v, positions, seg, fresh: bool):
    """The call's keys/values after the cached ones (unless ``fresh``), with their episode
    positions and segments (the cache belongs to segment 0): ``(keys, values, key_pos,
    key_seg)``, the keys axis being axis 1."""
    if fresh:
        return k, v, positions, seg
    return (
        jnp.concatenate([state.k.astype(k.dtype), k], axis=1),
        jnp.concatenate([state.v.astype(v.dtype), v], axis=1),
        jnp.concatenate([state.slot_pos, positions], axis=1),
        jnp.concatenate([jnp.zeros_like(state.slot_pos), seg], axis=1),
    )


def episode_positions(pos, resets, batch: int, time: int):
    """Segments and episode-relative positions of a call's tokens.

    Segment 0 continues the state's episode (positions ``pos + t``); segment j > 0 starts
    at the j-th reset inside the call (positions count from 0 there). Returns
    ``(seg, positions)``, both (batch, time) int32.
    """
    steps = jnp.arange(time, dtype=jnp.int32)[None, :]
    if resets is None:
        return jnp.zeros((batch, time), jnp.int32), pos[:, None] + steps
    seg = jnp.cumsum(resets.astype(jnp.int32), axis=1)
    last_reset = jax.lax.cummax(jnp.where(resets, steps, -1), axis=1)
    positions = jnp.where(seg > 0, steps - last_reset, pos[:, None] + steps)
    return seg, positions


def ring_buffer_update(state: AttentionState, k, v, positions, seg, window: int) -> AttentionState:
    """Ring-buffer write of the last tokens of the last episode; a reset clears the cache.

    ``state`` holds ``window`` slots (any trailing shapes of k and v); the entry of the
    token at episode position p goes to slot ``p % window``. Used by every layer whose
    memory is the last ``window`` entries of the current episode.
    """
    time = k.shape[1]
    last_seg = seg[:, -1:]
    cleared = last_seg[:, 0] > 0  # the last token starts or continues a new episode
    keep = ~cleared

    def kept(buf, fill):
        return jnp.where(keep.reshape((-1,) + (1,) * (buf.ndim - 1)), buf, fill)

    n = min(time, window)
    pos_tail = positions[:, time - n :]
    in_last = seg[:, time - n :] == last_seg
    slots = jnp.where(in_last, pos_tail % window, window)  # index `window` is dropped

    def write(buf, idx, val):
        return buf.at[idx].set(val, mode="drop")

    return AttentionState(
        k=jax.vmap(write)(kept(state.k, 0), slots, k[:, time - n :].astype(state.k.dtype)),
        v=jax.vmap(write)(kept(state.v, 0), slots, v[:, time - n :].astype(state.v.dtype)),
        slot_pos=jax.vmap(write)(kept(state.slot_pos, -1), slots, pos_tail),
        pos=positions[:, -1] + 1,
    )
