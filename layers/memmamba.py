"""MemMamba: Mamba blocks with a note-taking state pool, cross-token and cross-layer attention.

Wang et al., "MemMamba: Rethinking Memory Patterns in State Space Model" (arXiv
2510.03279). No official code is public and the method section's exact operators were
not available to us; what follows is the paper's structure with every open choice made
explicit as a field (the table below says which default we took and why).

Layer l (:class:`MemMambaBlock`, which holds its :class:`MambaMixer`), on the residual
stream ``u`` (batch, time, d)::

    h_t   = RMSNorm(u_t)                                       the Mamba block's pre-norm
    y_t   = u_t + MambaMixer(h)_t                              x^{l+1}: the Mamba block (fp32 residual)
    Note Block:
      s_t = sigmoid(score_note(h_t))                           salience I_token(x_t^l)
      v_t = W_sum h_t                      (d -> pool_dim)      summary N_l(x_t^l)
      s_t > tau_1  =>  write v_t (times the note gate) into the pool
    Cross-token attention:
      n_t = RMSNorm(y_t);  r_t = sigmoid(score_read(n_t))      retrieval score I_state
      c_t = MHA(q = W_q n_t, K = W_k Pool_{t-1}, V = W_v Pool_{t-1})   over valid entries
      out_t = y_t + g(r_t - tau_2) * W_o c_t                   (F_tok; "gated" fusion adds sigma(W_f n_t) *)

and the stack (:class:`MemMambaStack`; the zoo's ``memmamba`` family) adds, after
every layer l with (l + 1) % p == 0, cross-layer attention from the stream to the pools
of the earlier layers (F_lay)::

    x_t <- x_t + W'_o MHA(q = W'_q RMSNorm(x_t), K, V from Pool^j_{t-1}, j < l)

A pool holds ``pool_size`` slots (entries (batch, P, pool_dim), salience (batch, P)) and
``count``, the notes written in the episode; the valid slots are ``0 .. min(count, P)-1``.
When the pool is full, a new note replaces the entry with the lowest salience if its own
salience is higher (``replace="salience"``: the pool keeps the P most salient notes seen,
ties keep the older), or the oldest entry (``replace="oldest"``: a ring buffer). A token
reads the pool before its own note is written. An empty pool reads as exactly zero, so
with ``note_threshold >= 1`` (nothing is ever written) a MemMamba model equals Mamba with
the same weights.

Gates (``note_gate``, ``read_gate``), with the score s and threshold tau:
``"hard"`` 1[s > tau] (no gradient to the scorer); ``"soft"`` sigmoid((s - tau)/T)
(``T = gate_temperature``; differentiable, changes the forward value); ``"ste"`` the hard
value forward, the soft gradient backward (straight-through). Which notes are written is
always the hard threshold (a slot cannot be written "half"); the note gate scales the
stored summary: the gradient reaches the note scorer only through it (``soft``/``ste``),
and reaches ``W_sum`` and the tokens through the summaries that later reads attend to.
Which note the salience rule keeps is piecewise constant in the scores, so where a new
note's salience ties an entry's the layer's function has a kink (either choice gives the
same value, not the same slope).

Two paths compute the same pools and reads (``pool_impl``):

* ``"reference"``: a ``lax.scan`` over tokens: clear on reset, read, insert (the rule
  above, written as it reads). The ground truth.
* ``"chunked"`` (training): a ``lax.scan`` over chunks of ``pool_chunk`` tokens. All
  tokens of a chunk read the pool as it was at the chunk's start (masked to empty after
  a reset inside the chunk), in one batched attention; the chunk's notes are then
  merged into the pool at once (the P best of old entries and new notes by salience,
  new notes filling the freed slots in order; or the ring buffer advanced by the
  chunk's notes). At ``pool_chunk=1`` this is the reference (values and gradients).
  At larger chunks it approximates it in one way only: a token does not see the notes
  written earlier in its own chunk (at most ``pool_chunk - 1`` tokens back); the pool
  after a chunk holds the same notes as the reference's (FIFO: the same slots; salience:
  the same set up to ties, possibly in other slots -- reads do not depend on slot order)
  given the same layer inputs. Chunks count from the start of each call, so with
  ``pool_chunk > 1`` a sequence fed in pieces sees notes at slightly different delays
  than one call (the layer contract's streaming identity holds exactly at 1, the
  default).

Choices the paper leaves open (field: default -- why):

* ``pool_size`` P: 50, ``pool_dim``: 64 -- the sizes secondary summaries of the paper
  report (50 slots of 64-d summaries); cost per token O(P * pool_dim), constant in T.
* scorers (``score_hidden``): 0 = linear score from the normed token (an MLP of that
  width otherwise) -- the cheapest learned salience; the paper names no network.
* ``note_threshold`` tau_1 = 0.5 on sigmoid scores: at init about half the tokens
  qualify, so the pool fills and the salience rule, not the threshold, picks what stays.
* ``read_threshold`` tau_2 = 0.5 with the read scorer's bias at ``read_bias_init`` = 2
  (r ~ 0.88): reads start switched on and the model learns where to switch them off
  (a read that starts off gets no gradient through its hard forward value).
* ``note_gate``/``read_gate``: "ste" -- the forward pass is the hard-threshold function
  used at inference, and the scorers still learn.
* ``gate_temperature`` T = 0.1: a soft gate that goes from 0.27 to 0.73 over +-0.1 of
  score around the threshold.
* ``replace``: "salience" -- the paper's priority-based rule; "oldest" (FIFO) also named.
* summary: a linear projection of the normed token (the paper's "dimensionality
  reduction"); query from the normed Mamba output (the retrieval score looks at the
  state after the token, the paper's I_state(z)); multi-head attention with
  ``num_heads`` = 4 heads of pool_dim / heads, no positions (a pool is a set).
* ``fusion``: "add" (residual mapping) -- "gated" multiplies by a learned sigmoid gate
  per channel; both are named in the paper.
* cross-layer (stack only): ``cross_layer_every`` p = 4, over the pools of all earlier
  layers (``cross_layer_pools`` = 0; n > 0 reads only the n layers just before), read
  unconditionally (the paper triggers it by depth only), pools concatenated as one set.
  With ``pool_impl="chunked"`` each layer's pool scan also returns the pool as it was at
  every chunk's start, and the cross-layer reads attend to those (all chunks at once)
  instead of replaying the earlier layers' pools: the same values, without re-running
  up to ``n_layers - 1`` pool scans per read (``CROSS_READ_FROM_HISTORY``).
* ``read_init_scale`` = 0: the output projections of the reads (W_o, W'_o) start at zero,
  so an untrained MemMamba computes exactly its Mamba backbone and the reads grow in as
  they help (the first update of W_o opens the gradient to the rest of the read path);
  s > 0 initialises them like Mamba's ``out_proj``, U(+-s/sqrt(fan_in)) / sqrt(n_layers).

State (float32; ``count`` int32)::

    y, state = MemMambaBlock(mixer=MambaMixer(features=d))(u, state, resets)
    state: MemMambaState(mamba=MambaState(conv, ssm),
                         pool=NotePool(entries=(batch, P, pool_dim), salience=(batch, P), count=(batch,)))

Logical axis names: 'embed', 'mlp', 'state', 'conv' (Mamba), 'heads', 'head_dim' (the
pool attention) and 'note' (the summary width pool_dim).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .base import Dtype, begin_call, check_sequence, check_state, compute_dtype, expected_state, partitioned, state_dtype
from .mamba import MambaMixer, MambaState, fan_in_uniform, mamba_residual
from .norms import RMSNorm
from .note_pool import NotePool, Notes, empty_pool, gate, read_history, scan_chunked, scan_reference

GATES = ("hard", "soft", "ste")
REPLACE = ("salience", "oldest")
FUSIONS = ("add", "gated")
POOL_IMPLS = ("chunked", "reference")


class MemMambaState(NamedTuple):
    mamba: MambaState
    pool: NotePool




class PoolAttention(nn.Module):
    """Multi-head attention from a (normed) stream to note pools that it updates as it
    goes: ``out (batch, T, d), final_pools = PoolAttention(...)(n, pools0, notes, resets)``."""

    features: int
    pool_dim: int
    num_heads: int
    replace: str = "salience"
    pool_impl: str = "chunked"
    pool_chunk: int = 1
    n_layers: int = 1
    read_init_scale: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, n, pools0: Sequence[NotePool], notes: Sequence[Notes], resets=None, history=None,
                 return_history: bool = False):
        """``history`` (chunked only): the pools at each chunk's start, read instead of
        replaying ``pools0`` and ``notes`` (the final pools are then not computed: None).
        ``return_history``: also return the pools at each chunk's start (None for the
        reference path)."""
        d, W, H = self.features, self.pool_dim, self.num_heads
        D = W // H
        pdt = self.param_dtype
        w_q = self.param("query", partitioned(fan_in_uniform(d), ("embed", "heads", "head_dim")), (d, H, D), pdt)
        w_k = self.param("key", partitioned(fan_in_uniform(W), ("note", "heads", "head_dim")), (W, H, D), pdt)
        w_v = self.param("value", partitioned(fan_in_uniform(W), ("note", "heads", "head_dim")), (W, H, D), pdt)
        out_init = fan_in_uniform(W, self.read_init_scale / math.sqrt(self.n_layers)) if self.read_init_scale else nn.initializers.zeros
        w_o = self.param("out", partitioned(out_init, ("heads", "head_dim", "embed")), (H, D, d), pdt)
        sdt = pools0[0].entries.dtype  # the pool arithmetic runs in the state dtype
        q = jnp.einsum("btd,dhk->bthk", n.astype(sdt), w_q.astype(sdt))
        hist = None
        if self.pool_impl == "reference":
            reads, pools = scan_reference(pools0, notes, resets, q, w_k, w_v, self.replace)
        elif history is not None:
            reads, pools = read_history(q, history, resets, w_k, w_v, self.pool_chunk), None
        else:
            reads, pools, *hist = scan_chunked(pools0, notes, resets, q, w_k, w_v, self.replace, self.pool_chunk,
                                               history=return_history)
            hist = hist[0] if hist else None
        out = jnp.einsum("bthk,hkd->btd", reads, w_o.astype(sdt))
        out = out.astype(compute_dtype(self.dtype, n))
        return (out, pools, hist) if return_history else (out, pools)


class Scorer(nn.Module):
    """A score in (0, 1) per token: sigmoid of a linear map (or of a SiLU MLP of width
    ``hidden``). x: (batch, T, d) -> (batch, T)."""

    hidden: int = 0
    bias_init: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.hidden:
            x = nn.Dense(self.hidden, kernel_init=partitioned(fan_in_uniform(d), ("embed", "mlp")),
                         bias_init=partitioned(nn.initializers.zeros, ("mlp",)), name="hidden", **kw)(x)
            x, d = jax.nn.silu(x), self.hidden
        logit = nn.Dense(1, kernel_init=partitioned(fan_in_uniform(d), ("mlp" if self.hidden else "embed", None)),
                         bias_init=partitioned(nn.initializers.constant(self.bias_init), (None,)), name="logit", **kw)(x)
        return jax.nn.sigmoid(logit[..., 0].astype(jnp.promote_types(logit.dtype, jnp.float32)))


class MemMambaBlock(nn.Module):
    """A MemMamba layer: the Mamba block around the :class:`MambaMixer` it holds (``norm``,
    ``mixer``: the same parameters as :class:`~mnemax.layers.mamba.MambaBlock`), the Note
    Block and cross-token attention to its pool (module docstring). Every part runs in the
    mixer's dtype and param_dtype; the mixer's ``n_layers`` also scales the read's
    ``read_init_scale`` init.

    Attributes:
      mixer: the MambaMixer (unbound: built outside any module, or with ``parent=None``).
      norm_eps, residual_in_fp32: the Mamba block's (``norm_eps`` also the read norm's).
      pool_size ... pool_impl: the pool, its gates and its attention (module docstring).
    """

    mixer: MambaMixer
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    pool_size: int = 50
    pool_dim: int = 64
    num_heads: int = 4
    note_threshold: float = 0.5
    read_threshold: float = 0.5
    note_gate: str = "ste"
    read_gate: str = "ste"
    gate_temperature: float = 0.1
    replace: str = "salience"
    score_hidden: int = 0
    fusion: str = "add"
    read_bias_init: float = 2.0
    read_init_scale: float = 0.0
    pool_chunk: int = 1
    pool_impl: str = "chunked"

    @property
    def features(self) -> int:
        return self.mixer.features

    def _check_pool_config(self) -> None:
        """Raises ValueError naming the first pool option out of range."""
        for field, value, allowed in (
            ("note_gate", self.note_gate, GATES), ("read_gate", self.read_gate, GATES),
            ("replace", self.replace, REPLACE), ("fusion", self.fusion, FUSIONS), ("pool_impl", self.pool_impl, POOL_IMPLS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        for field in ("pool_size", "pool_dim", "num_heads", "pool_chunk"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.pool_dim % self.num_heads:
            raise ValueError(f"pool_dim ({self.pool_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.gate_temperature <= 0:
            raise ValueError(f"gate_temperature must be > 0, got {self.gate_temperature}")

    def pool_attention(self, **kw) -> PoolAttention:
        """The attention of this layer's pool reads (its own ``read``, and the stack's
        cross-layer reads), with ``kw`` (``name``, ``parent``) passed on."""
        m = self.mixer
        return PoolAttention(
            features=m.features, pool_dim=self.pool_dim, num_heads=self.num_heads, replace=self.replace,
            pool_impl=self.pool_impl, pool_chunk=self.pool_chunk, n_layers=m.n_layers,
            read_init_scale=self.read_init_scale, dtype=m.dtype, param_dtype=m.param_dtype, **kw,
        )

    def initial_state(self, batch_size: int) -> MemMambaState:
        self._check_pool_config()
        mamba = self.mixer.initial_state(batch_size)
        return MemMambaState(mamba, empty_pool(batch_size, self.pool_size, self.pool_dim, state_dtype(self.mixer.dtype)))

    def __call__(self, u, state: MemMambaState | None = None, resets=None):
        y, state, *_ = self.forward(u, state, resets)
        return y, state

    @nn.compact
    def forward(self, u, state: MemMambaState | None = None, resets=None):
        """Like ``__call__``, and also returns the layer's :class:`Notes` and its pool at each
        chunk's start (a one-tuple of NotePool with a leading chunk axis; None for the
        reference path), for cross-layer reads."""
        self._check_pool_config()
        _, _, resets, state, _ = begin_call(self, u, self.features, state, resets)
        kw = dict(dtype=self.mixer.dtype, param_dtype=self.mixer.param_dtype)
        sdt = state_dtype(self.mixer.dtype)
        y, mamba_state, h = mamba_residual(self, u, state.mamba, resets)

        # Note Block: salience, summary, hard write decision, gated value.
        salience = Scorer(self.score_hidden, name="note_score", **kw)(h).astype(sdt)
        summary = nn.DenseGeneral(
            self.pool_dim, use_bias=False, kernel_init=partitioned(fan_in_uniform(self.features), ("embed", "note")),
            name="summary", **kw,
        )(h).astype(sdt)
        note_gate = gate(salience, self.note_threshold, self.note_gate, self.gate_temperature)
        notes = Notes(summary * note_gate[..., None], salience, salience > self.note_threshold)
        self.sow("intermediates", "notes", notes)

        # Cross-token attention to the pool, triggered by the retrieval score.
        n, _ = RMSNorm(eps=self.norm_eps, name="read_norm", **kw)(y)
        retrieval = Scorer(self.score_hidden, self.read_bias_init, name="read_score", **kw)(n)
        read, pools, history = self.pool_attention(name="read")(n, (state.pool,), (notes,), resets, return_history=True)
        if self.fusion == "gated":
            read = read * jax.nn.sigmoid(
                nn.Dense(self.features, kernel_init=partitioned(fan_in_uniform(self.features), ("embed", "embed")),
                         bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="fuse", **kw)(n)
            )
        g = gate(retrieval, self.read_threshold, self.read_gate, self.gate_temperature)
        out = y + (g[..., None].astype(read.dtype) * read).astype(y.dtype)
        return out, MemMambaState(mamba_state, pools[0]), notes, history


class CrossLayerRead(nn.Module):
    """Cross-layer attention: ``x + read(RMSNorm(x), pools of earlier layers)`` with the
    :class:`PoolAttention` it holds (``read``; the norm runs in its dtypes).

    ``sources`` are (incoming pool, notes[, pools at each chunk's start]) of the earlier
    layers. A token reads each earlier pool as it was before that token (before its
    chunk): from the recorded chunk-start pools when every source has them and
    ``CROSS_READ_FROM_HISTORY`` is on, else by replaying the pools with the same rule and
    chunking as in the layers themselves."""

    read: PoolAttention
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x, sources: Sequence[tuple[NotePool, Notes]], resets=None):
        n, _ = RMSNorm(eps=self.norm_eps, dtype=self.read.dtype, param_dtype=self.read.param_dtype, name="norm")(x)
        pools0, notes = [s[0] for s in sources], [s[1] for s in sources]
        hists = [s[2] if len(s) > 2 else None for s in sources]
        history = None
        if CROSS_READ_FROM_HISTORY and all(h is not None for h in hists):
            history = tuple(p for h in hists for p in h)
        read, _ = self.read(n, pools0, notes, resets, history)
        return x + read.astype(x.dtype)


def cross_layer_read(block: MemMambaBlock, **kw) -> CrossLayerRead:
    """The cross-layer read of a stack of ``block`` layers: its pool attention and norm eps."""
    return CrossLayerRead(read=block.pool_attention(parent=None), norm_eps=block.norm_eps, **kw)


# Cross-layer reads attend to the pools the earlier layers recorded at each chunk's start
# (True) or replay those layers' pool scans (False; the same values, kept for tests).
CROSS_READ_FROM_HISTORY = True


def cross_layer_sources(layer: int, every: int, span: int) -> range:
    """The earlier layers whose pools ``layer`` reads (empty: no cross-layer attention)."""
    if every < 1 or layer < 1 or (layer + 1) % every:
        return range(0)
    return range(max(0, layer - span) if span > 0 else 0, layer)


def run_layers(
    x,
    states,
    resets,
    make_block: Callable[[int], MemMambaBlock],
    make_cross: Callable[[int], CrossLayerRead],
    n_layers: int,
    every: int,
    span: int,
    after_layer: Callable = lambda x: x,
):
    """The MemMamba stack: layer l, then (if l reads earlier pools) its cross-layer read.

    ``make_block(l)``/``make_cross(l)`` build named submodules of the caller; ``states``
    is a tuple of :class:`MemMambaState` or None; ``after_layer`` maps each layer's output
    (casts, recording). Returns (x, tuple of new states, tuple of the layers' notes)."""
    sources, new_states = [], []
    for l in range(n_layers):
        block = make_block(l)
        state = None if states is None else states[l]
        pool0 = block.initial_state(x.shape[0]).pool if state is None else state.pool
        x, state, notes, history = block.forward(x, state, resets)
        sources.append((pool0, notes, history))
        new_states.append(state)
        earlier = cross_layer_sources(l, every, span)
        if len(earlier):
            x = make_cross(l)(x, [sources[j] for j in earlier], resets)
        x = after_layer(x)
    return x, tuple(new_states), tuple(src[1] for src in sources)


class MemMambaStack(nn.Module):
    """``block.mixer.n_layers`` MemMamba layers, each a copy of ``block`` (its own
    parameters), with cross-layer attention every ``cross_layer_every`` layers (over the
    ``cross_layer_pools`` earlier pools, 0 = all); the layer contract on (batch, time,
    features) with the state a tuple of :class:`MemMambaState`."""

    block: MemMambaBlock
    cross_layer_every: int = 4
    cross_layer_pools: int = 0

    @property
    def features(self) -> int:
        return self.block.features

    @property
    def n_layers(self) -> int:
        return self.block.mixer.n_layers

    def initial_state(self, batch_size: int) -> tuple:
        return tuple(self.block.initial_state(batch_size) for _ in range(self.n_layers))

    def __call__(self, x, state=None, resets=None):
        y, states, _ = self.forward(x, state, resets)
        return y, states

    @nn.compact
    def forward(self, x, state=None, resets=None):
        """Returns (y, states, the layers' notes)."""
        check_sequence(x, self.features, name="x")
        if state is not None:
            check_state(state, expected_state(self, x.shape[0]))
        return run_layers(
            x, state, resets, lambda l: self.block.copy(name=f"block_{l}"),
            lambda l: cross_layer_read(self.block, name=f"cross_layer_{l}"),
            self.n_layers, self.cross_layer_every, self.cross_layer_pools,
        )
