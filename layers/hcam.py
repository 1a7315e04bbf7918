"""HCAM: Hierarchical Chunk Attention Memory (Lampinen et al., 2021, "Towards mental
time travel: a hierarchical memory for reinforcement learning agents").

Memory: the past of an episode is cut into chunks of ``C`` consecutive steps (chunk
boundaries at episode positions 0, C, 2C, ...); a ring buffer keeps the last ``M``
complete chunks, each with its contents ``m_j`` (C, d) and its key ``k_j`` = the mean of
its contents. The current, incomplete chunk fills an accumulator; when it is full it is
written to the buffer (slot = ordinal mod M).

Read (deepmind-research ``hierarchical_attention/htm_attention.py``) for the query
``h_t``::

    a_j   = (W_q h_t) . (W_k k_j) / sqrt(F)            over the chunks in memory
    S_t   = top-k chunks by a_j;   w_j = softmax_{j in S_t}(a_j)    (over the k only)
    o_j   = MHA(query = h_t, keys = values = m_j + PE)  (within-chunk attention, PE =
            sinusoidal position within the chunk, own q/k/v/out projections with bias)
    read_t = sum_{j in S_t} w_j o_j

with a stop-gradient on the memory (``stop_gradient_memory``) and masked chunks never
selected with weight > 0 (a step with an empty memory reads 0). Initialisers follow
the reference: variance scaling (scale ``init_scale`` = 2, fan-in, truncated normal).

Local attention: step t also attends causally, with multi-head attention (RoPE, no
bias), to the steps of its own current chunk (the accumulator and itself). It is
computed here rather than with ``CausalSelfAttention`` because its keys are
exactly the accumulator's contents (no separate KV cache, and the window is the
chunk, not the last C steps). The layer returns ``local_t + read_t``.

Resets: with ``persist_across_resets=False`` (the default, the layer contract) a reset
clears the memory, the accumulator and the position, so the state after a reset equals
a fresh sequence's. With ``True`` (the paper's setting across episodes) a reset clears
only the accumulator and restarts chunk boundaries; the memory and its ordinals carry
over, so later episodes can read chunks of earlier ones. The contract's "reset ==
fresh sequence" then holds only for the clearing setting (tests check both).

Two implementations give the same numbers: ``impl="parallel"`` (default) handles a
whole call at once (the new chunks of the call are found from episode positions and
gathered from the accumulator + inputs; visibility by chunk ordinals), and
``impl="sequential"`` is a plain ``lax.scan`` over steps with the ring buffer in the
carry, the reference the tests hold the parallel path to.

Shapes::

    y, state = HCAMAttention(features=d, chunk_size=C, num_chunks=M, top_k=k)(x, state, resets)
    x, y: (batch, time, d)
    state: HCAMState(
        contents:     (batch, M, C, d)  float32  stored chunks
        keys:         (batch, M, d)     float32  their means
        slot_ordinal: (batch, M) int32  write ordinal of each slot's chunk, -1 if empty
        written:      (batch,) int32    chunks written in the memory's lifetime
        accumulator:  (batch, C, d)     float32  the current chunk's first pos % C steps
        pos:          (batch,) int32    episode position of the next step)

Parallel cost per call: O(T k C d) for the within-chunk attention (the k selected chunks
are gathered per step) plus O(T (M + T/C) d) for the chunk relevance.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .attention import episode_positions, rope
from .base import Dtype, begin_call, check_sequence, compute_dtype, partitioned, state_dtype
from .mlp import MLP
from .norms import make_norm


class HCAMState(NamedTuple):
    contents: jax.Array
    keys: jax.Array
    slot_ordinal: jax.Array
    written: jax.Array
    accumulator: jax.Array
    pos: jax.Array


def sinusoid_position_encoding(length: int, width: int, min_timescale: float = 2.0, max_timescale: float = 1e4):
    """(length, width) sinusoids as in the reference: row j encodes position
    ``length - 1 - j`` (sines, then cosines, over frequencies ``max^(-f/width)``,
    f = 0, 2, 4, ...)."""
    freqs = np.arange(0, width, min_timescale)
    inv = max_timescale ** (-freqs / width)
    angles = np.arange(length - 1, -1, -1.0)[:, None] * inv[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)[:, :width]


def _softmax_masked(logits, valid, axis=-1):
    """Softmax over the valid entries only; all-invalid rows give zeros (no NaN, no
    overflow in either branch of the gradient)."""
    big = jnp.finfo(logits.dtype).min
    m = jnp.max(jnp.where(valid, logits, big), axis=axis, keepdims=True)
    safe = jnp.where(valid, logits, m)
    e = jnp.where(valid, jnp.exp(safe - m), 0)
    total = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(total > 0, total, 1)


class HCAMAttention(nn.Module):
    """HCAM read/write plus local attention in the current chunk (module docstring)."""

    features: int
    num_heads: int = 4
    chunk_size: int = 16
    num_chunks: int = 64
    top_k: int = 4
    key_size: int | None = None
    local_attention: bool = True
    memory_position_encoding: bool = True
    stop_gradient_memory: bool = True
    persist_across_resets: bool = False
    init_scale: float = 2.0
    impl: str = "parallel"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _check_config(self):
        if self.chunk_size < 1 or self.num_chunks < 1:
            raise ValueError(f"chunk_size and num_chunks must be >= 1, got {self.chunk_size}, {self.num_chunks}")
        if not 1 <= self.top_k <= self.num_chunks:
            raise ValueError(f"top_k must be in [1, num_chunks={self.num_chunks}], got {self.top_k}")
        if self.features % self.num_heads:
            raise ValueError(f"features ({self.features}) must be divisible by num_heads ({self.num_heads})")
        if self.local_attention and (self.features // self.num_heads) % 2:
            raise ValueError(
                f"features // num_heads must be even for the local attention's rotary positions, got "
                f"{self.features} // {self.num_heads}"
            )
        if self.impl not in ("parallel", "sequential"):
            raise ValueError(f"impl must be 'parallel' or 'sequential', got {self.impl!r}")

    def initial_state(self, batch_size: int) -> HCAMState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        b, m, c, d = batch_size, self.num_chunks, self.chunk_size, self.features
        return HCAMState(
            contents=jnp.zeros((b, m, c, d), sdt),
            keys=jnp.zeros((b, m, d), sdt),
            slot_ordinal=jnp.full((b, m), -1, jnp.int32),
            written=jnp.zeros((b,), jnp.int32),
            accumulator=jnp.zeros((b, c, d), sdt),
            pos=jnp.zeros((b,), jnp.int32),
        )

    def _params(self, dt):
        d, h = self.features, self.num_heads
        hd, f = d // h, self.key_size or d
        vs = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        lecun = nn.initializers.lecun_normal()

        def w(name, shape, names, init=vs):
            return self.param(name, partitioned(init, names), shape, self.param_dtype).astype(dt)

        def zeros(name, shape, names):
            return self.param(name, partitioned(nn.initializers.zeros, names), shape, self.param_dtype).astype(dt)

        p = {
            "read_query": w("read_query", (d, f), ("embed", None)),
            "read_key": w("read_key", (d, f), ("embed", None)),
        }
        for n in ("query", "key", "value"):
            p[f"mem_{n}"] = w(f"mem_{n}", (d, h, hd), ("embed", "heads", "head_dim"))
            p[f"mem_{n}_bias"] = zeros(f"mem_{n}_bias", (h, hd), ("heads", "head_dim"))
        p["mem_out"] = w("mem_out", (h, hd, d), ("heads", "head_dim", "embed"))
        p["mem_out_bias"] = zeros("mem_out_bias", (d,), ("embed",))
        if self.local_attention:
            for n in ("query", "key", "value"):
                p[f"local_{n}"] = w(f"local_{n}", (d, h, hd), ("embed", "heads", "head_dim"), lecun)
            p["local_out"] = w("local_out", (h, hd, d), ("heads", "head_dim", "embed"), lecun)
        return p

    @nn.compact
    def __call__(self, x, state: HCAMState | None = None, resets=None):
        self._check_config()
        _, _, resets, state, _ = begin_call(self, x, self.features, state, resets)
        dt = compute_dtype(self.dtype, x)
        p = self._params(dt)
        pe = jnp.asarray(sinusoid_position_encoding(self.chunk_size, self.features), dt)
        if not self.memory_position_encoding:
            pe = jnp.zeros_like(pe)
        h = x.astype(dt)
        if self.impl == "sequential":
            return self._sequential(p, pe, h, state, resets)
        return self._parallel(p, pe, h, state, resets)

    # ------------------------------------------------------------------ shared pieces

    def _relevance(self, p, h, keys):
        """(..., d) queries x (..., n, d) chunk keys -> (..., n) logits / sqrt(F)."""
        q = h @ p["read_query"]
        k = keys @ p["read_key"]
        return jnp.einsum("...f,...nf->...n", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))

    def _memory(self, contents):
        return jax.lax.stop_gradient(contents) if self.stop_gradient_memory else contents

    # ------------------------------------------------------------------ parallel path

    def _parallel(self, p, pe, h, state: HCAMState, resets):
        batch, time, d = h.shape
        c, m, k, heads = self.chunk_size, self.num_chunks, self.top_k, self.num_heads
        hd = d // heads
        sdt = state.contents.dtype
        seg, positions = episode_positions(state.pos, resets, batch, time)
        off = positions % c
        is_end = off == c - 1
        persistent = self.persist_across_resets
        life = jnp.zeros_like(seg) if persistent else seg  # memory lifetime of each step
        ends = is_end.astype(jnp.int32)
        before = jnp.cumsum(ends, axis=1) - ends  # chunk ends strictly before t in this call
        if not persistent and resets is not None:
            before = before - jax.lax.cummax(jnp.where(resets, before, 0), axis=1)
        written_before = jnp.where(life == 0, state.written[:, None], 0) + before  # W_t

        # The call's steps after the accumulator, right-aligned: ext[t + C - 1] = h_t.
        n0 = state.pos % c
        j = jnp.arange(c - 1)[None, :] - (c - 1 - n0[:, None])
        acc = jnp.take_along_axis(state.accumulator.astype(h.dtype), jnp.clip(j, 0, c - 1)[..., None], axis=1)
        acc = jnp.where((j >= 0)[..., None], acc, 0)
        ext = jnp.concatenate([acc, h], axis=1)  # (batch, time + C - 1, d)

        # New complete chunks of this call: the C steps ending at each chunk end.
        n_new = -(-time // c)
        rank = jnp.where(is_end, jnp.cumsum(ends, axis=1) - 1, n_new)  # j-th end of the call -> j
        steps_i32 = jnp.arange(time, dtype=jnp.int32)
        end_idx = jax.vmap(lambda r: jnp.full((n_new,), time, jnp.int32).at[r].set(steps_i32, mode="drop"))(rank)
        new_valid = end_idx < time
        e_safe = jnp.minimum(end_idx, time - 1)
        window = e_safe[:, :, None] + jnp.arange(c)[None, None, :]
        new_contents = jax.vmap(lambda e, i: e[i])(ext, window)  # (batch, n_new, C, d)
        new_keys = jnp.mean(new_contents, axis=2)
        new_ord = jnp.take_along_axis(written_before, e_safe, axis=1)
        new_life = jnp.take_along_axis(life, e_safe, axis=1)

        # Candidates = the state's slots + the new chunks; visibility per step.
        cand_contents = self._memory(jnp.concatenate([state.contents.astype(h.dtype), new_contents], axis=1))
        cand_keys = self._memory(jnp.concatenate([state.keys.astype(h.dtype), new_keys], axis=1))
        cand_ord = jnp.concatenate([state.slot_ordinal, new_ord], axis=1)[:, None, :]
        cand_life = jnp.concatenate([jnp.zeros_like(state.slot_ordinal), new_life], axis=1)[:, None, :]
        cand_end = jnp.concatenate([jnp.full_like(state.slot_ordinal, -1), end_idx], axis=1)[:, None, :]
        cand_valid = jnp.concatenate([state.slot_ordinal >= 0, new_valid], axis=1)[:, None, :]
        wb = written_before[:, :, None]
        steps = jnp.arange(time)[None, :, None]
        visible = (
            cand_valid & (cand_life == life[:, :, None]) & (cand_end < steps) & (cand_ord >= wb - m) & (cand_ord < wb)
        )

        logits = self._relevance(p, h, cand_keys[:, None])  # (batch, time, M + n_new)
        logits = jnp.where(visible, logits, jnp.finfo(logits.dtype).min)
        top_logits, top_idx = jax.lax.top_k(logits, k)  # (batch, time, k)
        top_visible = jnp.take_along_axis(visible, top_idx, axis=2)
        weights = _softmax_masked(top_logits, top_visible)

        # Within-chunk attention to the selected chunks (gathered once, raw + PE).
        aug = cand_contents + pe
        sel = jax.vmap(lambda a, i: a[i])(aug, top_idx)  # (batch, time, k, C, d)
        qm = jnp.einsum("btd,dhe->bthe", h, p["mem_query"]) + p["mem_query_bias"]
        qk = jnp.einsum("bthe,fhe->bthf", qm, p["mem_key"])
        qb = jnp.einsum("bthe,he->bth", qm, p["mem_key_bias"])
        scores = (jnp.einsum("bthf,btkcf->btkhc", qk, sel) + qb[:, :, None, :, None]) / jnp.sqrt(
            jnp.asarray(hd, h.dtype)
        )
        att = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("btkhc,btkcf->btkhf", att, sel)
        o = jnp.einsum("btkhf,fhe->btkhe", ctx, p["mem_value"]) + p["mem_value_bias"]
        o = jnp.einsum("btk,btkhe->bthe", weights, o)
        read = jnp.einsum("bthe,hef->btf", o, p["mem_out"]) + jnp.sum(weights, -1, keepdims=True) * p["mem_out_bias"]

        y = read
        if self.local_attention:
            ext_off = jnp.concatenate([jnp.maximum(j, 0), off], axis=1)  # within-chunk offsets of ext
            y = y + self._local_parallel(p, h, ext, off, ext_off)

        # New state.
        life_last = life[:, -1]
        written = written_before[:, -1] + ends[:, -1]
        keep_old = jnp.ones((batch,), bool) if persistent else seg[:, -1] == 0
        write = new_valid & (new_life == life_last[:, None]) & (new_ord >= written[:, None] - m)
        slots = jnp.where(write, new_ord % m, m)

        def put(buf, idx, val):
            return buf.at[idx].set(val, mode="drop")

        def kept(buf, fill):
            return jnp.where(keep_old.reshape((-1,) + (1,) * (buf.ndim - 1)), buf, fill)

        pos = positions[:, -1] + 1
        n_last = pos % c
        tail = (time + c - 1) - n_last[:, None] + jnp.arange(c)[None, :]
        acc_new = jnp.take_along_axis(ext, jnp.clip(tail, 0, time + c - 2)[..., None], axis=1)
        acc_new = jnp.where((jnp.arange(c)[None, :] < n_last[:, None])[..., None], acc_new, 0)
        new_state = HCAMState(
            contents=jax.vmap(put)(kept(state.contents, 0), slots, new_contents.astype(sdt)),
            keys=jax.vmap(put)(kept(state.keys, 0), slots, new_keys.astype(sdt)),
            slot_ordinal=jax.vmap(put)(kept(state.slot_ordinal, -1), slots, new_ord),
            written=written,
            accumulator=acc_new.astype(sdt),
            pos=pos,
        )
        return y, new_state

    def _local_parallel(self, p, h, ext, off, ext_off):
        """Causal attention of each step to the steps of its own chunk (within the last C
        of ext); rotary positions are the within-chunk offsets."""
        batch, time, d = h.shape
        c, heads = self.chunk_size, self.num_heads
        hd = d // heads
        q = rope(jnp.einsum("btd,dhe->bthe", h, p["local_query"]), off)
        kx = rope(jnp.einsum("btd,dhe->bthe", ext, p["local_key"]), ext_off)
        vx = jnp.einsum("btd,dhe->bthe", ext, p["local_value"])
        kw = jnp.stack([kx[:, i : i + time] for i in range(c)], axis=2)  # (batch, time, C, H, hd)
        vw = jnp.stack([vx[:, i : i + time] for i in range(c)], axis=2)
        scores = jnp.einsum("bthe,btche->bthc", q, kw) / jnp.sqrt(jnp.asarray(hd, h.dtype))
        visible = (jnp.arange(c)[None, None, :] >= (c - 1 - off)[:, :, None])[:, :, None, :]
        att = _softmax_masked(scores, visible)
        out = jnp.einsum("bthc,btche->bthe", att, vw)
        return jnp.einsum("bthe,hef->btf", out, p["local_out"])

    # ------------------------------------------------------------------ sequential reference

    def _sequential(self, p, pe, h, state: HCAMState, resets):
        """The reference: a lax.scan over steps with the ring buffer in the carry."""
        batch, time, d = h.shape
        c, m, k, heads = self.chunk_size, self.num_chunks, self.top_k, self.num_heads
        hd = d // heads
        sdt = state.contents.dtype
        fresh = self.initial_state(batch)
        if resets is None:
            resets = jnp.zeros((batch, time), bool)

        def read_one(h_t, contents, keys, ordinal):
            valid = ordinal >= 0
            logits = self._relevance(p, h_t, keys)
            logits = jnp.where(valid, logits, jnp.finfo(logits.dtype).min)
            top_logits, top_idx = jax.lax.top_k(logits, k)
            w = _softmax_masked(top_logits, valid[top_idx])
            q = jnp.einsum("d,dhe->he", h_t, p["mem_query"]) + p["mem_query_bias"]
            chunks = self._memory(contents)[top_idx] + pe  # (k, C, d)
            kk = jnp.einsum("kcd,dhe->kche", chunks, p["mem_key"]) + p["mem_key_bias"]
            vv = jnp.einsum("kcd,dhe->kche", chunks, p["mem_value"]) + p["mem_value_bias"]
            att = jax.nn.softmax(jnp.einsum("he,kche->khc", q, kk) / jnp.sqrt(jnp.asarray(hd, h_t.dtype)), axis=-1)
            o = jnp.einsum("khc,kche->khe", att, vv)
            o = jnp.einsum("khe,hef->kf", o, p["mem_out"]) + p["mem_out_bias"]
            return jnp.einsum("k,kf->f", w, o)

        def local_one(acc, n):
            """acc (C, d) holds the chunk so far including this step at index n."""
            q = jnp.einsum("d,dhe->he", acc[n], p["local_query"])
            kk = jnp.einsum("cd,dhe->che", acc, p["local_key"])
            vv = jnp.einsum("cd,dhe->che", acc, p["local_value"])
            q = rope(q[None, None], jnp.full((1, 1), n))[0, 0]
            kk = rope(kk[None], jnp.arange(c)[None])[0]
            scores = jnp.einsum("he,che->hc", q, kk) / jnp.sqrt(jnp.asarray(hd, acc.dtype))
            att = _softmax_masked(scores, (jnp.arange(c) <= n)[None, :])
            return jnp.einsum("hc,che,hef->f", att, vv, p["local_out"])

        def step(carry, inputs):
            h_t, r_t = inputs
            if self.persist_across_resets:
                kept = carry._replace(accumulator=jnp.zeros_like(carry.accumulator), pos=jnp.zeros_like(carry.pos))
            else:
                kept = fresh
            carry = jax.tree.map(lambda a, b: jnp.where(r_t.reshape((-1,) + (1,) * (a.ndim - 1)), b, a), carry, kept)
            n = carry.pos % c
            y = jax.vmap(read_one)(h_t, carry.contents.astype(h_t.dtype), carry.keys.astype(h_t.dtype), carry.slot_ordinal)
            acc = jax.vmap(lambda a, i, v: a.at[i].set(v))(carry.accumulator.astype(h_t.dtype), n, h_t)
            if self.local_attention:
                y = y + jax.vmap(local_one)(acc, n)
            full = n == c - 1
            slot = jnp.where(full, carry.written % m, m)
            put = jax.vmap(lambda buf, i, v: buf.at[i].set(v, mode="drop"))
            new = HCAMState(
                contents=put(carry.contents, slot, acc.astype(sdt)),
                keys=put(carry.keys, slot, jnp.mean(acc, axis=1).astype(sdt)),
                slot_ordinal=put(carry.slot_ordinal, slot, carry.written),
                written=carry.written + full.astype(jnp.int32),
                accumulator=jnp.where(full[:, None, None], 0, acc).astype(sdt),
                pos=carry.pos + 1,
            )
            return new, y

        final, ys = jax.lax.scan(step, state, (jnp.moveaxis(h, 1, 0), jnp.moveaxis(resets, 1, 0)))
        return jnp.moveaxis(ys, 0, 1), final


class HCAMBlock(nn.Module):
    """Transformer block with HCAM: ``h = norm(x); x = x + hcam(h)`` (local attention in the
    current chunk + the memory read, both added to the residual; the memory stores ``h``),
    then ``x = x + MLP(norm(x))``. ``hcam`` is the :class:`HCAMAttention` it holds (unbound;
    its parameters and state are the block's; the norms and MLP run in its dtypes). State:
    :class:`HCAMState`."""

    hcam: HCAMAttention
    mlp_ratio: float = 4.0
    mlp_kind: str = "swiglu"
    norm: str = "rms"

    @property
    def features(self) -> int:
        return self.hcam.features

    def initial_state(self, batch_size: int) -> HCAMState:
        return self.hcam.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: HCAMState | None = None, resets=None):
        check_sequence(x, self.features)
        kw = dict(dtype=self.hcam.dtype, param_dtype=self.hcam.param_dtype)
        h, _ = make_norm(self.norm, name="attn_norm", **kw)(x)
        h, state = self.hcam(h, state, resets)
        x = x + h.astype(x.dtype)
        h, _ = make_norm(self.norm, name="mlp_norm", **kw)(x)
        h, _ = MLP(hidden=int(round(self.mlp_ratio * self.features)), kind=self.mlp_kind, name="mlp", **kw)(h)
        return x + h.astype(x.dtype), state
