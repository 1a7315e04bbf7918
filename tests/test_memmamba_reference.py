"""MemMamba's memory path against an independent numpy reference.

The reference below (everything above the ``mnemax side`` line) imports numpy and math
only -- nothing from mnemax, jax or flax -- and is written from the equations in the
module docstring of ``mnemax.layers.memmamba``, not from its code:

* the backbone: numpy RMSNorm and the Mamba mixer (in_proj, depthwise causal conv that
  forgets the inputs before a reset, SiLU, x_proj, softplus dt, the S6 recurrence with
  zero-order-hold decay, D skip, SiLU(z) gate, out_proj) from the equations of
  ``mnemax.layers.mamba`` / ``mnemax.kernels.selective_scan``; the residual y = u + mixer;
* the Note Block: the scorers (linear, or a SiLU MLP), salience s = sigmoid(score(h)),
  summary W_sum h times the note gate, the write decision s > tau_1;
* the note pool as per-row Python bookkeeping: clear on reset; the one-note rule (FIFO,
  or "a full pool replaces its lowest-salience entry -- the lowest slot among ties -- if
  the new salience is strictly higher"); the count of notes written;
* the reads: per-token softmax attention over the valid entries (a token with none reads
  exactly zero), read before the token's own note is written; W_o, the read gate
  g(r - tau_2), "add"/"gated" fusion;
* the stack's cross-layer reads, computed by replaying the earlier layers' notes into
  fresh copies of their pools (the same rule), concatenated as one set;
* ``pool_chunk > 1``: the documented chunk semantics (all tokens of a chunk read the
  pool at the chunk's start, masked to empty after a reset inside the chunk; then the
  chunk's notes are merged: "the P best of old entries and new notes by salience, ties
  ranking old above new, a higher slot above a lower one and an earlier note above a
  later one, kept new notes filling the freed slots in ascending order", or the FIFO
  ring advanced by the chunk's notes).

The reference computes in float64 and rounds the saliences to float32 (the pool's
documented state dtype), so that exact ties stay ties. Its only inputs from the library
are the parameter values, read from the flax params dict by name. The mnemax layers run
with ``pool_impl="reference"`` and ``pool_impl="chunked"`` (``pool_chunk`` 1 in the stack,
4 and 5 in the layer), with
every documented option at a non-default value somewhere, and the test checks that the
run actually exercises the rule: some tokens write and some do not, pools fill and then
replace (and reject) notes, the salience rule meets ties, the read gate is on and off,
and the read changes the output.
"""

import math

import numpy as np

# ============================================================================ numpy reference


def np_sigmoid(x):
    x = np.asarray(x, np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def np_silu(x):
    return x * np_sigmoid(x)


def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_segment_starts(resets):
    """(batch, time): the index of the first token of each token's episode."""
    batch, time = resets.shape
    start = np.zeros((batch, time), int)
    for b in range(batch):
        s = 0
        for t in range(time):
            if resets[b, t]:
                s = t
            start[b, t] = s
    return start


def np_mamba_mixer(p, h, resets):
    """Mamba's mixer on (batch, time, d), fresh state. Returns (out, conv tail, ssm state)."""
    batch, time, _ = h.shape
    xz = np.einsum("btd,dce->btce", h, p["in_proj"]["kernel"])
    if "bias" in p["in_proj"]:
        xz = xz + p["in_proj"]["bias"]
    x, z = xz[:, :, 0], xz[:, :, 1]
    E = x.shape[-1]
    w = p["conv1d"]["kernel"]  # (width, E): y_t = bias + sum_j w[j] x_{t - (width-1) + j}
    width = w.shape[0]
    start = np_segment_starts(resets)
    xc = np.zeros_like(x) + p["conv1d"].get("bias", 0.0)
    for t in range(time):
        for j in range(width):
            s = t - (width - 1) + j
            if s >= 0:
                xc[:, t] += np.where((s >= start[:, t])[:, None], w[j] * x[:, s], 0.0)
    xc = np_silu(xc)
    R, N = p["dt_proj"]["kernel"].shape[0], p["A_log"].shape[1]
    xdbl = xc @ p["x_proj"]["kernel"]
    dt_low, Bm, Cm = xdbl[..., :R], xdbl[..., R : R + N], xdbl[..., R + N :]
    dt = np_softplus(dt_low @ p["dt_proj"]["kernel"] + p["dt_bias"])
    A = -np.exp(p["A_log"])
    ssm = np.zeros((batch, E, N))
    ys = []
    for t in range(time):
        ssm = np.where(resets[:, t, None, None], 0.0, ssm)
        ssm = np.exp(dt[:, t, :, None] * A) * ssm + dt[:, t, :, None] * Bm[:, t, None, :] * xc[:, t, :, None]
        ys.append(np.einsum("ben,bn->be", ssm, Cm[:, t]) + p["D"] * xc[:, t])
    y = np.stack(ys, axis=1) * np_silu(z)
    out = y @ p["out_proj"]["kernel"]
    if "bias" in p["out_proj"]:
        out = out + p["out_proj"]["bias"]
    # the conv state: the last width-1 conv inputs, zero before the last reset / the start
    tail = np.zeros((batch, width - 1, E))
    for i, s in enumerate(range(time - (width - 1), time)):
        if s >= 0:
            tail[:, i] = np.where((s >= start[:, -1])[:, None], x[:, s], 0.0)
    return out, tail, ssm


def np_scorer_logit(p, x):
    """The pre-sigmoid score: linear, or a SiLU MLP when the scorer has a hidden layer."""
    if "hidden" in p:
        x = np_silu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return x @ p["logit"]["kernel"][:, 0] + p["logit"]["bias"][0]


def np_gate(score, threshold, kind, temperature):
    """"hard" and "ste" (its forward value): 1[s > tau]; "soft": sigmoid((s - tau) / T)."""
    if kind in ("hard", "ste"):
        return (score > threshold).astype(np.float64)
    assert kind == "soft", kind
    return np_sigmoid((score - threshold) / temperature)


class NpPool:
    """A note pool: entries (batch, P, W), salience (batch, P) float32, count (batch,)."""

    def __init__(self, batch, size, width):
        self.entries = np.zeros((batch, size, width))
        self.salience = np.zeros((batch, size), np.float32)
        self.count = np.zeros(batch, int)

    def copy(self):
        new = NpPool(*self.entries.shape)
        new.entries, new.salience, new.count = self.entries.copy(), self.salience.copy(), self.count.copy()
        return new

    def clear(self, b):
        self.entries[b] = 0.0
        self.salience[b] = 0.0
        self.count[b] = 0

    def valid_entries(self, b):
        return self.entries[b, : min(self.count[b], self.salience.shape[1])]

    def _put(self, b, slot, value, salience):
        self.entries[b, slot] = value
        self.salience[b, slot] = salience

    def insert(self, b, value, salience, replace, events=None):
        """One written note (the reference rule)."""
        size = self.salience.shape[1]
        n = self.count[b]
        if replace == "oldest":
            self._put(b, n % size, value, salience)
            event = "fill" if n < size else "replace"
        elif n < size:
            self._put(b, n, value, salience)
            event = "fill"
        else:
            lowest = self.salience[b].min()
            slots = np.flatnonzero(self.salience[b] == lowest)
            if salience > lowest:
                self._put(b, slots[0], value, salience)
                event = "replace_tied_lowest" if len(slots) > 1 else "replace"
            else:
                event = "reject_tie" if salience == lowest else "reject"
        self.count[b] = n + 1
        if events is not None:
            events[event] = events.get(event, 0) + 1

    def merge(self, b, notes, replace, events=None):
        """A chunk's written notes [(value, salience)] at once (the documented chunk merge)."""
        size = self.salience.shape[1]
        n = self.count[b]
        found = []
        if replace == "oldest":
            for k, (value, salience) in enumerate(notes):  # the last P survive
                self._put(b, (n + k) % size, value, salience)
            found += ["replace"] * max(0, n + len(notes) - max(n, size))
        else:
            cands = [(float(self.salience[b, i]), i, "old") for i in range(min(n, size))]
            cands += [(float(s), -1 - k, "new") for k, (_, s) in enumerate(notes)]
            ranked = sorted(cands, key=lambda c: (c[0], c[1]), reverse=True)
            kept, dropped = ranked[:size], ranked[size:]
            kept_old = {c[1] for c in kept if c[2] == "old"}
            kept_new = sorted(-1 - c[1] for c in kept if c[2] == "new")
            free = [i for i in range(size) if i not in kept_old]
            for slot, k in zip(free, kept_new):
                self._put(b, slot, *notes[k])
            found += ["replace" if c[2] == "old" else "reject" for c in dropped]
            if dropped and kept[-1][0] == dropped[0][0]:
                found.append("tie_at_cut")  # the tie order decides what stays
        self.count[b] = n + len(notes)
        if events is not None:
            for event in found:
                events[event] = events.get(event, 0) + 1


def np_attend(q, entries, w_k, w_v):
    """Multi-head attention of one query q (H, D) to a set of entries (M, W): zero if M == 0."""
    if len(entries) == 0:
        return np.zeros_like(q)
    k = np.einsum("mw,whd->mhd", entries, w_k)
    v = np.einsum("mw,whd->mhd", entries, w_v)
    logits = np.einsum("hd,mhd->hm", q, k) / math.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = probs / probs.sum(axis=-1, keepdims=True)
    return np.einsum("hm,mhd->hd", probs, v)


def np_pool_reads(q, w_k, w_v, sources, resets, replace, chunk=None, events=None):
    """Reads of queries q (batch, T, H, D) from pools that the sources' notes update.

    sources: [(pool, values (B, T, W), salience (B, T), write (B, T))]; each pool is copied.
    chunk None: token by token (clear on reset, read all pools as one set, then insert).
    chunk C: the chunk semantics of the module docstring. Returns (reads, final pools)."""
    batch, time = q.shape[:2]
    pools = [s[0].copy() for s in sources]
    reads = np.zeros(q.shape)
    for b in range(batch):
        if chunk is None:
            for t in range(time):
                if resets[b, t]:
                    for pool in pools:
                        pool.clear(b)
                entries = np.concatenate([pool.valid_entries(b) for pool in pools])
                reads[b, t] = np_attend(q[b, t], entries, w_k, w_v)
                for pool, (_, values, sal, write) in zip(pools, sources):
                    if write[b, t]:
                        pool.insert(b, values[b, t], sal[b, t], replace, events)
        else:
            for lo in range(0, time, chunk):
                steps = range(lo, min(lo + chunk, time))
                entries = np.concatenate([pool.valid_entries(b) for pool in pools])
                cut = [t for t in steps if resets[b, t]]
                for t in steps:  # a token after a reset inside its chunk sees an empty pool
                    if not any(c <= t for c in cut):
                        reads[b, t] = np_attend(q[b, t], entries, w_k, w_v)
                first = cut[-1] if cut else lo
                for pool, (_, values, sal, write) in zip(pools, sources):
                    if cut:
                        pool.clear(b)
                    notes = [(values[b, t], sal[b, t]) for t in range(first, steps[-1] + 1) if write[b, t]]
                    pool.merge(b, notes, replace, events)
    return reads, pools


def np_backbone(p, u, resets, cfg):
    """h = RMSNorm(u) and y = u + MambaMixer(h). Returns (h, y, conv tail, ssm state)."""
    h = np_rms_norm(u, p["norm"]["scale"], cfg["norm_eps"])
    m, conv, ssm = np_mamba_mixer(p["mixer"], h, resets)
    return h, u + m, conv, ssm


def np_block(p, u, resets, cfg, pool0=None, chunk=None, events=None):
    """A MemMamba layer on (batch, T, d) (fresh Mamba state; pool0 or an empty pool).
    Returns a dict with the output, the notes, the scores, the gates and the new state."""
    batch = u.shape[0]
    h, y, conv, ssm = np_backbone(p, u, resets, cfg)
    # Note Block
    note_logit = np_scorer_logit(p["note_score"], h)
    salience = np_sigmoid(note_logit).astype(np.float32)  # the pool's float32 salience
    s = salience.astype(np.float64)
    note_gate = np_gate(s, cfg["note_threshold"], cfg["note_gate"], cfg["gate_temperature"])
    values = (h @ p["summary"]["kernel"]) * note_gate[..., None]
    write = s > cfg["note_threshold"]
    # cross-token read
    n = np_rms_norm(y, p["read_norm"]["scale"], cfg["norm_eps"])
    read_logit = np_scorer_logit(p["read_score"], n)
    r = np_sigmoid(read_logit)
    att = p["read"]
    q = np.einsum("btd,dhk->bthk", n, att["query"])
    if pool0 is None:
        pool0 = NpPool(batch, cfg["pool_size"], cfg["pool_dim"])
    reads, (pool,) = np_pool_reads(q, att["key"], att["value"], [(pool0, values, salience, write)], resets,
                                   cfg["replace"], chunk, events)
    read = np.einsum("bthk,hkd->btd", reads, att["out"])
    if cfg["fusion"] == "gated":
        read = read * np_sigmoid(n @ p["fuse"]["kernel"] + p["fuse"]["bias"])
    else:
        assert cfg["fusion"] == "add", cfg["fusion"]
    g = np_gate(r, cfg["read_threshold"], cfg["read_gate"], cfg["gate_temperature"])
    out = y + g[..., None] * read
    return dict(out=out, y=y, h=h, values=values, salience=salience, write=write, retrieval=r, read_gate=g,
                read=read, note_logit=note_logit, read_logit=read_logit, pool0=pool0, pool=pool, conv=conv, ssm=ssm)


def np_cross_layer_sources(layer, every, span):
    """The earlier layers that layer ``layer`` reads: after layer l with (l + 1) % every == 0,
    the ``span`` layers just before (all earlier ones for span 0)."""
    if (layer + 1) % every or layer == 0:
        return []
    return list(range(max(0, layer - span) if span > 0 else 0, layer))


def np_stack(params, x, resets, cfg, chunk=None, events=None):
    """MemMambaStack: layer l, then (if it reads earlier pools) x += W'_o MHA(W'_q RMSNorm(x),
    the earlier layers' pools as they were before each token, concatenated)."""
    layers, cross = [], {}
    for l in range(cfg["n_layers"]):
        out = np_block(params[f"block_{l}"], x, resets, cfg, chunk=chunk, events=events)
        layers.append(out)
        x = out["out"]
        earlier = np_cross_layer_sources(l, cfg["cross_layer_every"], cfg["cross_layer_pools"])
        if earlier:
            p = params[f"cross_layer_{l}"]
            n = np_rms_norm(x, p["norm"]["scale"], cfg["norm_eps"])
            q = np.einsum("btd,dhk->bthk", n, p["read"]["query"])
            sources = [(layers[j]["pool0"], layers[j]["values"], layers[j]["salience"], layers[j]["write"])
                       for j in earlier]
            reads, _ = np_pool_reads(q, p["read"]["key"], p["read"]["value"], sources, resets, cfg["replace"], chunk)
            delta = np.einsum("bthk,hkd->btd", reads, p["read"]["out"])
            cross[l] = dict(sources=earlier, delta=delta)
            x = x + delta
    return x, layers, cross


# ============================================================================ mnemax side

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from mnemax.layers.mamba import MambaMixer  # noqa: E402
from mnemax.layers.memmamba import MemMambaBlock, MemMambaStack  # noqa: E402

BATCH = 2
MAMBA = dict(features=8, d_state=4, d_conv=3, expand=2, norm_eps=1e-5, backend="reference")

# A: the salience rule with exact ties, hard note gate, soft read gate, gated fusion, linear
# scorers, 2 heads, and the init knobs (its parameters start from the layer's own init).
CFG_A = dict(MAMBA, pool_size=3, pool_dim=4, num_heads=2, note_threshold=0.3, read_threshold=0.6, note_gate="hard",
             read_gate="soft", gate_temperature=0.25, replace="salience", score_hidden=0, fusion="gated",
             read_bias_init=0.4, read_init_scale=2.0)
# B: FIFO, soft note gate, hard read gate, "add" fusion, SiLU MLP scorers, 3 heads. (B and S
# draw every parameter, so their init knobs read_bias_init / read_init_scale do not enter.)
CFG_B = dict(MAMBA, pool_size=3, pool_dim=6, num_heads=3, note_threshold=0.6, read_threshold=0.35, note_gate="soft",
             read_gate="hard", gate_temperature=0.05, replace="oldest", score_hidden=5, fusion="add")
# S: the stack (straight-through gates: their forward value is the hard one); layer 1 reads
# pool 0, layer 3 reads pools 1 and 2 as one set (not 0: cross_layer_pools=2).
CFG_S = dict(MAMBA, pool_size=3, pool_dim=4, num_heads=2, note_threshold=0.55, read_threshold=0.45, note_gate="ste",
             read_gate="ste", gate_temperature=0.1, replace="salience", score_hidden=0, fusion="add",
             n_layers=4, cross_layer_every=2, cross_layer_pools=2)

TIME = {"A": 18, "B": 16, "S": 14}
RESETS = {"A": [(0, 10), (1, 4), (1, 13)], "B": [(1, 7)], "S": [(1, 6)]}  # (row, token)
SEEDS = {"A": 11, "B": 12, "S": 13}

# A's inputs: the note scorer reads channels 0 and 1 of h = RMSNorm(u) only, with a huge
# weight on channel 0 -- so tokens with u_0 = +-1.5 (HI / LO) score exactly 1 / 0 (the
# sigmoid saturates) and tokens with u_0 = u_1 = 0 (TIE) score exactly sigmoid(0) = 0.5:
# ties between notes of different content; tokens with u_0 = 0, u_1 != 0 (CONT) score in
# between.
HI, LO, TIE, CONT = range(4)


def _resets(name):
    r = np.zeros((BATCH, TIME[name]), bool)
    for b, t in RESETS[name]:
        r[b, t] = True
    return r


def _inputs(name):
    rng = np.random.default_rng(SEEDS[name])
    u = rng.standard_normal((BATCH, TIME[name], 8))
    kind = None
    if name == "A":
        kind = rng.choice(4, size=(BATCH, TIME[name]), p=[0.2, 0.15, 0.35, 0.3])
        u[..., 0] = np.select([kind == HI, kind == LO], [1.5, -1.5], 0.0)
        u[..., 1] = np.where(kind == TIE, 0.0, u[..., 1])
    return u.astype(np.float32), kind


def _module(cfg, **kw):
    """The block of ``cfg`` (its MambaMixer built from the mixer's options), or the stack
    of such blocks when ``cfg`` has ``n_layers``."""
    cfg = {**cfg, **kw}
    names = lambda cls: {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}  # noqa: E731
    mixer = MambaMixer(**{k: v for k, v in cfg.items() if k in names(MambaMixer)}, parent=None)
    block = MemMambaBlock(mixer=mixer, **{k: v for k, v in cfg.items() if k in names(MemMambaBlock) - {"mixer"}}, parent=None)
    if "n_layers" not in cfg:
        return block
    return MemMambaStack(block=block, **{k: v for k, v in cfg.items() if k in names(MemMambaStack) - {"block"}})


def _shapes(cfg, time):
    x = jax.ShapeDtypeStruct((BATCH, time, cfg["features"]), jnp.float32)
    return nn.unbox(jax.eval_shape(_module(cfg).init, jax.random.key(0), x))["params"]


def _random_params(tree, rng):
    """Every parameter drawn away from its init (norm scales around 1, biases non-zero,
    projections ~ N(0, 1/fan_in), Mamba's A_log / D / dt_bias near their inits)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _random_params(v, rng)
            continue
        shape = v.shape
        if k == "scale":
            a = 1.0 + 0.3 * rng.standard_normal(shape)
        elif k == "bias":
            a = 0.3 * rng.standard_normal(shape)
        elif k == "A_log":
            a = np.log(np.arange(1, shape[1] + 1))[None] + 0.2 * rng.standard_normal(shape)
        elif k == "D":
            a = 1.0 + 0.3 * rng.standard_normal(shape)
        elif k == "dt_bias":
            dt = np.exp(rng.uniform(np.log(1e-2), np.log(0.2), shape))
            a = dt + np.log(-np.expm1(-dt))
        else:
            a = rng.standard_normal(shape) / math.sqrt(shape[0])
        out[k] = a.astype(np.float32)
    return out


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _logit(p):
    return math.log(p / (1 - p))


def _center(scorer, raw_logit, threshold):
    """Moves a scorer's bias so that its score crosses ``threshold`` at the median token."""
    bias = scorer["logit"]["bias"]
    scorer["logit"]["bias"] = (bias + _logit(threshold) - np.median(raw_logit)).astype(np.float32)


_PARAMS = {}


def _params(name):
    """The test's parameters for configuration ``name`` (cached: shared by the pool impls)."""
    if name in _PARAMS:
        return _PARAMS[name]
    cfg = {"A": CFG_A, "B": CFG_B, "S": CFG_S}[name]
    rng = np.random.default_rng(100 + SEEDS[name])
    u, _ = _inputs(name)
    resets = _resets(name)
    if name == "A":
        # from the layer's own init (read_init_scale, read_bias_init), moved where init is trivial
        x = jax.ShapeDtypeStruct((BATCH, TIME[name], 8), jnp.float32)
        init = nn.unbox(jax.jit(lambda k: _module(cfg).lazy_init(k, x))(jax.random.key(3)))["params"]
        init = jax.tree.map(np.asarray, init)
        bound = cfg["read_init_scale"] / math.sqrt(cfg["pool_dim"])
        assert 0 < np.abs(init["read"]["out"]).max() <= bound  # W_o != 0: the read matters
        np.testing.assert_array_equal(init["read_score"]["logit"]["bias"], [np.float32(cfg["read_bias_init"])])
        p = _random_params(init, rng)
        for keep in ("query", "key", "value", "out"):
            p["read"][keep] = init["read"][keep]
        p["read_score"]["logit"]["bias"] = init["read_score"]["logit"]["bias"]
        p["read_score"]["logit"]["kernel"] = 3 * init["read_score"]["logit"]["kernel"]
        note = np.zeros((8, 1), np.float32)
        note[0, 0], note[1, 0] = 400.0, 1.5  # saturates at u_0 = +-1.5; continuous at u_0 = 0
        p["note_score"]["logit"] = dict(kernel=note, bias=np.zeros(1, np.float32))
        p["norm"]["scale"][:2] = np.abs(p["norm"]["scale"][:2]) + 0.5
    else:
        p = _random_params(_shapes(cfg, TIME[name]), rng)
        blocks = [p] if name == "B" else [p[f"block_{l}"] for l in range(cfg["n_layers"])]
        for l, bp in enumerate(blocks):  # spread the scores around the thresholds
            for scorer in ("note_score", "read_score"):
                bp[scorer]["logit"]["kernel"] *= 4
            x = u.astype(np.float64)
            if name == "S" and l:
                x = np_stack(_f64(p), x, resets, {**cfg, "n_layers": l})[0]
            ref = np_block(_f64(bp), x, resets, cfg)
            _center(bp["note_score"], ref["note_logit"], cfg["note_threshold"])
            _center(bp["read_score"], ref["read_logit"], cfg["read_threshold"])
    _PARAMS[name] = p
    return p


def _close(got, want, what, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol,
                               err_msg=what)


def _run(cfg, params, u, resets, impl, chunk):
    module = _module(cfg, pool_impl=impl, pool_chunk=chunk)
    (out, state), inter = jax.jit(lambda v, x, r: module.apply(v, x, None, r, mutable=["intermediates"]))(
        {"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(u), jnp.asarray(resets))
    return np.asarray(out), state, inter["intermediates"]


def _check_layer(ref, state, notes, what):
    (notes,) = notes
    _close(notes.salience, ref["salience"], f"{what}: salience")
    np.testing.assert_array_equal(np.asarray(notes.write), ref["write"], err_msg=f"{what}: write")
    _close(notes.values, ref["values"], f"{what}: note values")
    _close(state.mamba.conv, ref["conv"], f"{what}: conv state")
    _close(state.mamba.ssm, ref["ssm"], f"{what}: ssm state")
    np.testing.assert_array_equal(np.asarray(state.pool.count), ref["pool"].count, err_msg=f"{what}: count")
    _close(state.pool.salience, ref["pool"].salience, f"{what}: pool salience")
    _close(state.pool.entries, ref["pool"].entries, f"{what}: pool entries")


def _check_exercised(ref, cfg, events, what):
    """The run meets the rule: writes and non-writes, pools filled then replacing."""
    write = ref["write"]
    assert write.any() and (~write).any(), what
    assert ref["pool"].count.max() > cfg["pool_size"], what
    assert events.get("replace", 0) + events.get("replace_tied_lowest", 0) > 0, (what, events)
    if cfg["replace"] == "salience":
        assert events.get("reject", 0) + events.get("reject_tie", 0) > 0, (what, events)


@pytest.mark.parametrize(
    "name,impl,chunk",
    [("A", "reference", 1), ("A", "chunked", 4), ("B", "reference", 1), ("B", "chunked", 5)],
)
def test_block_matches_numpy(name, impl, chunk):
    """MemMambaBlock (output, Mamba state, pool entries/salience/count, sown notes) == the
    numpy layer: token by token for pool_impl "reference", and the documented chunk
    semantics for "chunked" at pool_chunk 4 (A: 18 tokens, the last chunk padded, resets at
    a chunk's start and inside chunks) and 5 (B: FIFO merges of several notes, a reset
    inside a chunk, a last chunk of one token). ("chunked" at pool_chunk 1 against the
    token-by-token reference: the stack test.) A: salience rule with exact ties (a full pool of
    tied lowest entries replaces the lowest slot; a note tied with the lowest is rejected),
    hard note gate, soft read gate, gated fusion; B: FIFO, soft note gate scaling the stored
    summaries, hard read gate switching reads on and off, MLP scorers."""
    cfg = {"A": CFG_A, "B": CFG_B}[name]
    u, kind = _inputs(name)
    resets = _resets(name)
    params = _params(name)
    events = {}
    ref = np_block(_f64(params), u.astype(np.float64), resets, cfg, chunk=None if chunk == 1 else chunk, events=events)
    out, state, inter = _run(cfg, params, u, resets, impl, chunk)

    _check_layer(ref, state, inter["notes"], f"{name} {impl} {chunk}")
    _close(out, ref["out"], f"{name} {impl} {chunk}: output")

    # what the run exercises
    live = np.abs(ref["read_gate"][..., None] * ref["read"]).max(axis=-1)
    assert live.max() > 0.05  # the read changes the output
    sal = np.asarray(inter["notes"][0].salience)
    if name == "A":
        np.testing.assert_array_equal(sal[kind == TIE], 0.5)  # the designed ties are exact in mnemax too
        np.testing.assert_array_equal(sal[kind == HI], 1.0)
        _check_exercised(ref, cfg, events, name)
        if chunk == 1:
            assert events.get("replace_tied_lowest", 0) > 0 and events.get("reject_tie", 0) > 0, events
        else:
            assert events.get("tie_at_cut", 0) > 0, events
    else:
        _check_exercised(ref, cfg, events, name)
        assert set(np.unique(ref["read_gate"])) == {0.0, 1.0}  # reads switched on and off
        gate = np_sigmoid((ref["salience"][ref["write"]] - cfg["note_threshold"]) / cfg["gate_temperature"])
        assert gate.min() < 0.9  # the soft note gate visibly scales some stored notes


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_stack_matches_numpy(impl):
    """MemMambaStack (4 layers, cross_layer_every 2, cross_layer_pools 2: layer 1 reads pool
    0, layer 3 reads pools 1 and 2 as one set, not pool 0) == the numpy stack: output, every
    layer's state and notes. pool_impl "reference" replays the earlier pools; "chunked"
    (pool_chunk 1) reads the pools the layers recorded at each chunk's start."""
    cfg = CFG_S
    u, _ = _inputs("S")
    resets = _resets("S")
    params = _params("S")
    events = {}
    want, layers, cross = np_stack(_f64(params), u.astype(np.float64), resets, cfg, events=events)
    out, states, inter = _run(cfg, params, u, resets, impl, 1)

    for l in range(cfg["n_layers"]):
        _check_layer(layers[l], states[l], inter[f"block_{l}"]["notes"], f"stack {impl} layer {l}")
    _close(out, want, f"stack {impl}: output")

    # what the run exercises
    assert sorted(cross) == [1, 3] and cross[1]["sources"] == [0] and cross[3]["sources"] == [1, 2]
    for l in range(cfg["n_layers"]):
        assert layers[l]["write"].any() and (~layers[l]["write"]).any(), l
        assert set(np.unique(layers[l]["read_gate"])) == {0.0, 1.0}, l
    for l in (1, 3):  # the cross-layer reads matter
        assert np.abs(cross[l]["delta"]).max() > 0.05
    assert max(layer["pool"].count.max() for layer in layers) > cfg["pool_size"]
    assert events.get("replace", 0) > 0 and events.get("reject", 0) > 0, events
