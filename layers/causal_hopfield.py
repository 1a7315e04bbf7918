"""Causal Hopfield sequence mixer: each step's state pattern retrieves from the stored
patterns of earlier steps (Ramsauer et al., 2020, used as a causal layer).

At step t (episode position p) the layer projects the input into a state pattern
``r_t = W_Q LN(x_t)``, a stored pattern ``y_t = W_K LN(x_t)`` and a pattern projection
``v_t = W_V LN(x_t)`` per head (hflayers' defaults: LayerNorms of state, stored and
projected patterns, N(0, 0.02) projections). The memory is a ring buffer of the last
``memory_size`` (M) stored patterns and their projections of the current episode:
steps ``p - M .. p - 1`` (``include_current=False``, the default: strictly earlier
steps) or ``p - M + 1 .. p`` (``include_current=True``). The Hopfield iteration of
:func:`~mnemax.layers.hopfield.associate` runs in the association space against that
memory (``update_steps_max``, ``update_steps_eps`` as in :class:`Hopfield`), and

    z_t = W_O concat_h( xi_t^h V^h ),   xi_t^h = the association of r_t^h with Y^h.

A step with an empty memory (the first step of an episode without
``include_current``) outputs ``W_O 0 = bias``.

With ``num_queries = Q`` the state patterns are Q learned vectors instead of ``r_t``
(a causal Hopfield pooling: at each step the learned queries pool the memory, so with
``include_current=True`` and M >= the episode length the last step's output is
:class:`HopfieldPooling` of the whole sequence); the Q outputs are joined by one output
projection ``(Q, heads, pattern_size) -> features``.

Shapes::

    y, state = CausalHopfield(features=F, num_heads=H, memory_size=M)(x, state, resets)
    x, y: (batch, time, F)
    state: AttentionState(
        k: (batch, M, H, hidden_size)  stored patterns (after projection and Hopfield-space norm)
        v: (batch, M, H, pattern_size) pattern projections
        slot_pos: (batch, M) int32     episode position of each slot, -1 if empty
        pos: (batch,) int32            episode position of the next step
        key_conv: ConvState of the stored-pattern conv, or () when key_conv == 0)

``key_conv > 0`` adds a causal depthwise conv of that width on the stored-pattern path
only (as :class:`~mnemax.layers.attention.CausalSelfAttention`'s ``key_conv``, the "shift"
of H3 and Based): a stored pattern then also sees the few steps before it, so the layer can
bind a value to the step that preceded it (associative recall). The retrieval itself has no
notion of order, so without it the layer cannot tell which value followed which key.

A reset empties the memory and restarts positions, so the state after a reset equals
a fresh sequence's. One call over T steps computes a (T, M + T) association per head
and query, like attention with a KV cache; streaming calls give the same numbers. When
T > M + ``query_block`` (default 512), the queries go in blocks of ``query_block`` steps,
each scored only against the keys its window can reach (the M cached slots, and the
M + block call steps before and inside it): (T, 2M + block) scores instead of
(T, M + T), so memory grows linearly with T (a 125M model at T = 32k, M = 2048 asked
for one 73.5 GiB buffer the dense way). Same numbers: the keys left out are the ones the
window masks (``query_block=None``: always dense).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from .attention import AttentionState, episode_positions, ring_buffer_update, with_cache
from .base import Dtype, begin_call, check_sequence, compute_dtype, partitioned, state_dtype
from .conv import CausalConv1d
from .hopfield import PatternOps, associate
from .mlp import MLP
from .norms import make_norm

CausalHopfieldState = AttentionState


class CausalHopfield(PatternOps, nn.Module):
    """Causal Hopfield retrieval from a ring buffer of earlier steps (module docstring)."""

    features: int
    num_heads: int = 1
    hidden_size: int | None = None
    pattern_size: int | None = None
    memory_size: int = 256
    include_current: bool = False
    num_queries: int | None = None
    scaling: float | Sequence[float] | None = None
    update_steps_max: int | None = 0
    update_steps_eps: float = 1e-4
    key_conv: int = 0
    query_block: int | None = 512
    normalize_stored_pattern: bool = True
    normalize_stored_pattern_affine: bool = True
    normalize_state_pattern: bool = True
    normalize_state_pattern_affine: bool = True
    normalize_pattern_projection: bool = True
    normalize_pattern_projection_affine: bool = True
    normalize_hopfield_space: bool = False
    normalize_hopfield_space_affine: bool = False
    norm_eps: float = 1e-5
    use_bias: bool = True
    dropout: float = 0.0
    deterministic: bool | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @property
    def _hd(self) -> int:
        return self._head_dim(self.features)

    @property
    def _pd(self) -> int:
        return self.pattern_size or self._hd

    def _check_config(self):
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.memory_size < 1:
            raise ValueError(f"memory_size must be >= 1, got {self.memory_size}")
        if self.num_queries is not None and self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1 or None, got {self.num_queries}")
        if self.key_conv < 0:
            raise ValueError(f"key_conv must be >= 0 (0: no conv), got {self.key_conv}")
        if self.query_block is not None and (not isinstance(self.query_block, int) or self.query_block < 1):
            raise ValueError(f"query_block must be a positive integer or None (dense), got {self.query_block!r}")
        self._head_dim(self.features)

    def _window(self, qp, kp):
        """True where the key at episode position ``kp`` is in the memory of the query at ``qp``."""
        m = self.memory_size
        if self.include_current:
            return (kp <= qp) & (qp - kp < m)
        return (kp < qp) & (qp - kp <= m)

    def _queries(self, q, lead: tuple, hd: int):
        """State patterns as (*lead, Q, hd), ``lead`` = (batch, H, *time axes): from x_t
        (q: (batch, *time axes, H, hd), Q = 1) or the learned queries (q: (Q, H, hd))."""
        if self.num_queries is None:
            return jnp.moveaxis(q, -2, 1)[..., None, :]
        qh = jnp.moveaxis(q, 1, 0).reshape((1, lead[1]) + (1,) * (len(lead) - 2) + (q.shape[0], hd))
        return jnp.broadcast_to(qh, lead + (q.shape[0], hd))

    def _blocked_association(self, q, k, v, positions, seg, state, fresh, dt):
        """The association in query blocks (module docstring): block b (call steps
        [b c, b c + c)) is scored against the cached slots and call steps [b c - M, b c + c).
        Returns ``xi`` (batch, H, time, Q, S_b) as blocks and the values, laid out so that
        the output einsum of the dense path applies after a reshape (see ``__call__``)."""
        batch, time = positions.shape
        m, c = self.memory_size, self.query_block
        nb = -(-time // c)
        padq = nb * c - time

        def pad(a, front, fill):  # (batch, time, ...) padded on the time axis
            return jnp.pad(a, [(0, 0), (front, padq)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)

        idx = (jnp.arange(nb) * c)[:, None] + jnp.arange(m + c)[None, :]  # (nb, M + c) into the front-padded steps
        kb, vb = pad(k, m, 0)[:, idx], pad(v, m, 0)[:, idx]  # (batch, nb, M + c, H, d)
        kpos, kseg = pad(positions, m, -1)[:, idx], pad(seg, m, -1)[:, idx]  # (batch, nb, M + c); -1: empty
        if not fresh:  # every block also sees the cached slots (segment 0)
            def cached(a):
                return jnp.broadcast_to(a[:, None], (batch, nb) + a.shape[1:])

            kb = jnp.concatenate([cached(state.k.astype(k.dtype)), kb], axis=2)
            vb = jnp.concatenate([cached(state.v.astype(v.dtype)), vb], axis=2)
            kpos = jnp.concatenate([cached(state.slot_pos), kpos], axis=2)
            kseg = jnp.concatenate([jnp.zeros_like(cached(state.slot_pos)), kseg], axis=2)
        qpos = pad(positions, 0, 0).reshape(batch, nb, c)
        qseg = pad(seg, 0, -2).reshape(batch, nb, c)  # -2: padded queries match no key
        mask = (qseg[..., :, None] == kseg[:, :, None, :]) & (kpos[:, :, None, :] >= 0)
        mask = mask & self._window(qpos[..., :, None], kpos[:, :, None, :])  # (batch, nb, c, S_b)
        heads, hd = k.shape[2], k.shape[3]
        if self.num_queries is None:
            q = pad(q, 0, 0).reshape((batch, nb, c) + q.shape[2:])
        qh = self._queries(q, (batch, heads, nb, c), hd)  # (batch, H, nb, c, Q, hd)
        kh = jnp.moveaxis(kb, 3, 1)[:, :, :, None]  # (batch, H, nb, 1, S_b, hd)
        beta = self._beta(hd, dt, trailing=4)
        xi = associate(qh, kh, beta, mask[:, None, :, :, None, :], self.update_steps_max, self.update_steps_eps)
        return xi, vb

    def initial_state(self, batch_size: int) -> AttentionState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        m, h = self.memory_size, self.num_heads
        return AttentionState(
            k=jnp.zeros((batch_size, m, h, self._hd), sdt),
            v=jnp.zeros((batch_size, m, h, self._pd), sdt),
            slot_pos=jnp.full((batch_size, m), -1, jnp.int32),
            pos=jnp.zeros((batch_size,), jnp.int32),
            key_conv=self._key_conv(parent=None).initial_state(batch_size) if self.key_conv else (),
        )

    def _key_conv(self, **kw) -> CausalConv1d:
        return CausalConv1d(features=self.features, width=self.key_conv, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

    @nn.compact
    def __call__(self, x, state: AttentionState | None = None, resets=None, *, deterministic: bool | None = None):
        self._check_config()
        batch, time, resets, state, fresh = begin_call(self, x, self.features, state, resets)
        dt = compute_dtype(self.dtype, x)
        hd, pd, heads, m = self._hd, self._pd, self.num_heads, self.memory_size
        x = x.astype(dt)

        key_conv_state = ()
        xs = x
        if self.key_conv:
            xs, key_conv_state = self._key_conv(name="key_conv")(x, state.key_conv, resets)
            xs = xs.astype(dt)
        stored = self._norm(xs, "norm_stored", self.normalize_stored_pattern_affine) if self.normalize_stored_pattern else xs
        proj_in = (
            self._norm(x, "norm_projection", self.normalize_pattern_projection_affine)
            if self.normalize_pattern_projection
            else x
        )
        if self.num_queries is None:
            state_in = x  # (batch, time, F)
        else:
            state_in = self.param(
                "pooling_weights",
                partitioned(nn.initializers.normal(0.02), (None, "embed")),
                (self.num_queries, self.features),
                self.param_dtype,
            ).astype(dt)  # (Q, F)
        if self.normalize_state_pattern:
            state_in = self._norm(state_in, "norm_state", self.normalize_state_pattern_affine)
        q = self._project(state_in, False, hd, "state", dt)  # (batch, time, H, hd) or (Q, H, hd)
        k = self._project(stored, False, hd, "stored", dt)  # (batch, time, H, hd)
        v = self._project(proj_in, False, pd, "projection", dt)
        if self.normalize_hopfield_space:
            q, k = self._norm((q, k), "norm_hopfield", self.normalize_hopfield_space_affine, ("head_dim",))

        seg, positions = episode_positions(state.pos, resets, batch, time)
        if self.query_block is not None and time > m + self.query_block:
            xi, values = self._blocked_association(q, k, v, positions, seg, state, fresh, dt)
        else:
            keys, values, key_pos, key_seg = with_cache(state, k, v, positions, seg, fresh)
            mask = (seg[:, :, None] == key_seg[:, None, :]) & (key_pos[:, None, :] >= 0)
            mask = mask & self._window(positions[:, :, None], key_pos[:, None, :])  # (batch, time, S)
            # Association layout (batch, H, time, Q, S): Q = 1 for state patterns from x_t.
            kh = jnp.moveaxis(keys, 2, 1)[:, :, None]  # (batch, H, 1, S, hd)
            qh = self._queries(q, (batch, heads, time), hd)
            beta = self._beta(hd, dt, trailing=3)
            xi = associate(qh, kh, beta, mask[:, None, :, None, :], self.update_steps_max, self.update_steps_eps)
        if self.dropout > 0.0 and not nn.merge_param("deterministic", self.deterministic, deterministic):
            xi = nn.Dropout(rate=self.dropout, deterministic=False, name="dropout")(xi)
        if xi.ndim == 6:  # query blocks: (batch, H, nb, c, Q, S_b) with values (batch, nb, S_b, H, pd)
            out = jnp.einsum("bhnkqs,bnshd->bnkqhd", xi, values)
            out = out.reshape((batch, -1) + out.shape[3:])[:, :time]
        else:
            out = jnp.einsum("bhtqs,bshd->btqhd", xi, values)  # (batch, time, Q, H, pd)
        if self.num_queries is None:
            y = self._out_projection(out[:, :, 0], self.features, dt)
        else:
            y = self._out_projection(out, self.features, dt, n_axes=3)
        return y, ring_buffer_update(state, k, v, positions, seg, m)._replace(key_conv=key_conv_state)


class CausalHopfieldBlock(nn.Module):
    """``x + hopfield(x)`` then ``x + MLP(norm(x))``, around the :class:`CausalHopfield` it
    holds (``hopfield``: unbound; its parameters and state are the block's). The Hopfield
    layer's own LayerNorms of state/stored/projected patterns (hflayers' defaults) act as
    its pre-norm; the norm and MLP run in its dtypes."""

    hopfield: CausalHopfield
    mlp_ratio: float = 4.0
    mlp_kind: str = "swiglu"
    norm: str = "rms"

    @property
    def features(self) -> int:
        return self.hopfield.features

    def initial_state(self, batch_size: int) -> AttentionState:
        return self.hopfield.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: AttentionState | None = None, resets=None):
        check_sequence(x, self.features)
        h, state = self.hopfield(x, state, resets)
        x = x + h.astype(x.dtype)
        kw = dict(dtype=self.hopfield.dtype, param_dtype=self.hopfield.param_dtype)
        h, _ = make_norm(self.norm, name="mlp_norm", **kw)(x)
        h, _ = MLP(hidden=int(round(self.mlp_ratio * self.features)), kind=self.mlp_kind, name="mlp", **kw)(h)
        return x + h.astype(x.dtype), state


class HopfieldPoolingBlock(nn.Module):
    """Causal Hopfield pooling that *replaces* the stream: ``y_t`` = the pooled memory of the
    last ``memory_size`` steps of the episode (no residual, so a classifier reading the last
    step sees HopfieldPooling of the sequence). ``pool`` is the :class:`CausalHopfield` it
    holds, with learned queries (``num_queries``) and the current step included
    (``include_current=True``). State: that of the pool."""

    pool: CausalHopfield

    @property
    def features(self) -> int:
        return self.pool.features

    def _check_pool(self):
        if not self.pool.include_current or self.pool.num_queries is None:
            raise ValueError(
                "HopfieldPoolingBlock's pool must pool with learned queries over the current step too: "
                f"include_current=True and num_queries >= 1, got include_current={self.pool.include_current}, "
                f"num_queries={self.pool.num_queries}"
            )

    def initial_state(self, batch_size: int) -> AttentionState:
        self._check_pool()
        return self.pool.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: AttentionState | None = None, resets=None):
        self._check_pool()
        y, state = self.pool(x, state, resets)
        return y.astype(x.dtype), state
