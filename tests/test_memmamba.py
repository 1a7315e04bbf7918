"""MemMamba: with nothing written it is Mamba; the chunk-parallel pool path equals the
token-by-token reference at chunk size 1 (values and gradients); the replacement rules on a
hand-built sequence and against a plain Python loop; the layer, the stack and the LM on the
contract; the 130m preset's size."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.layers.mamba import MambaMixer
from mnemax.layers.memmamba import MemMambaBlock, MemMambaStack
from mnemax.layers.note_pool import Notes, empty_pool, insert_note, merge_notes, pool_valid, scan_chunked, scan_reference

from .contract import check_layer_contract
from .test_mamba import _floats, mamba_130m_count
from .test_models import model_factory, tokens

TINY = dict(d_model=16, n_layers=2, pool_size=3, pool_dim=8, num_heads=2, chunk_size=4, read_init_scale=1.0)
MIXER = dict(features=16, d_state=4, d_conv=3, chunk_size=4)
POOL = dict(pool_size=3, pool_dim=8, num_heads=2, read_init_scale=1.0)


def memmamba_block(mixer=(), name=None, dtype=None, param_dtype=None, **pool):
    """A MemMambaBlock holding a MambaMixer of ``MIXER`` (+ ``mixer``), with ``POOL`` (+ ``pool``);
    the dtypes go to the mixer (the block runs in them), ``name`` to the block."""
    dtypes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    return MemMambaBlock(mixer=MambaMixer(**{**MIXER, **dict(mixer)}, **dtypes, parent=None), **{**POOL, **pool}, name=name)


def _tok(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, shape), jnp.int32)


def _copy_mamba(mm_params, mamba_params):
    """MemMamba params with every parameter the Mamba model also has taken from it."""
    out = dict(mm_params)
    for k, sub in mamba_params.items():
        out[k] = {**out[k], **sub} if k.startswith("block_") else sub
    return out


def test_nothing_written_equals_mamba():
    """note_threshold = 1 (sigmoid scores never exceed it): the MemMamba LM (with cross-layer
    reads and nonzero read projections) gives bit-identical logits and Mamba states to the
    Mamba LM with the same weights, also across a reset, and its pools stay empty. (With the
    default threshold the pools fill and the reads carry gradient: see the next test.)"""
    tok = _tok((2, 12))
    resets = jnp.zeros((2, 12), bool).at[1, 5].set(True)
    mamba = mnemax.create("mamba-tiny", **{k: TINY[k] for k in ("d_model", "n_layers", "chunk_size")})
    vm = jax.jit(mamba.init)(jax.random.key(1), tok)
    want, want_state = jax.jit(mamba.apply)(vm, tok, None, resets)
    model = mnemax.create("memmamba-tiny", **TINY, note_threshold=1.0, pool_chunk=4)
    params = _copy_mamba(model.init(jax.random.key(0), tok)["params"], vm["params"])
    got, state = jax.jit(model.apply)({"params": params}, tok, None, resets)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for s, w in zip(state.blocks, want_state.blocks):
        jax.tree.map(np.testing.assert_array_equal, s.mamba, w)
        assert int(s.pool.count.max()) == 0


def test_chunked_equals_reference_at_chunk_1(replace="salience"):
    """pool_impl='chunked' with pool_chunk=1 == pool_impl='reference' on the LM (own-pool and
    cross-layer reads, straight-through gates, pools of 3 slots over 14 tokens so that entries
    get replaced by salience, a reset in row 1): outputs, final states and gradients of every
    parameter. (The FIFO rule's gradients are held to finite differences by the block's
    contract test, its values to a Python loop below.)"""
    tok = _tok((2, 14), seed=3)
    resets = jnp.zeros((2, 14), bool).at[1, 6].set(True)
    w = jnp.asarray(np.random.default_rng(4).standard_normal((2, 14, 64)), jnp.float32)
    results = []
    for impl in ("chunked", "reference"):
        model = mnemax.create("memmamba-tiny", **TINY, replace=replace, pool_impl=impl, pool_chunk=1)
        v = jax.jit(model.init)(jax.random.key(0), tok)

        def loss(v):
            out, state = model.apply(v, tok, None, resets)
            pools = sum(jnp.sum(jnp.sin(s.pool.entries)) + jnp.sum(jnp.sin(s.pool.salience)) for s in state.blocks)
            return jnp.sum(out * w) + pools, (out, state)

        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(v))
    ((_, (out_c, st_c)), g_c), ((_, (out_r, st_r)), g_r) = results
    assert all(int(s.pool.count.min()) > 3 for s in st_r.blocks)  # the pools overflowed
    np.testing.assert_allclose(np.asarray(out_c), np.asarray(out_r), rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), st_c, st_r)
    read_grads = jax.tree.leaves(nn.meta.unbox(g_r["params"])["cross_layer_1"]) + jax.tree.leaves(nn.meta.unbox(g_r["params"])["block_0"]["summary"])
    assert all(float(jnp.abs(g).max()) > 0 for g in read_grads)  # the read path carries gradient
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6), g_c, g_r)


def test_cross_layer_reads_from_recorded_pools_equal_the_replay(monkeypatch):
    """Cross-layer reads from the pools each layer recorded at its chunks' starts (read for
    all chunks at once) equal the replay of the earlier layers' pool scans: 3 layers, every
    layer after the first reads all earlier pools, chunks of 4 over 14 tokens (the last
    chunk padded), pools that overflow, a reset inside a chunk; outputs, final states and
    the gradients of every parameter."""
    from mnemax.layers import memmamba

    tok = _tok((2, 14), seed=5)
    resets = jnp.zeros((2, 14), bool).at[1, 6].set(True)
    w = jnp.asarray(np.random.default_rng(6).standard_normal((2, 14, 64)), jnp.float32)
    model = mnemax.create("memmamba-tiny", **{**TINY, "n_layers": 3}, cross_layer_every=1, pool_chunk=4)
    v = jax.jit(model.init)(jax.random.key(0), tok)

    def loss(v):
        out, state = model.apply(v, tok, None, resets)
        return jnp.sum(out * w) + sum(jnp.sum(jnp.sin(s.pool.entries)) for s in state.blocks), (out, state)

    results = []
    for from_history in (True, False):
        monkeypatch.setattr(memmamba, "CROSS_READ_FROM_HISTORY", from_history)
        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(v))
    ((_, (out_h, st_h)), g_h), ((_, (out_r, st_r)), g_r) = results
    assert all(int(s.pool.count.max()) > 3 for s in st_r.blocks)  # the pools overflowed
    cross = jax.tree.leaves(nn.meta.unbox(g_r["params"])["cross_layer_2"])
    assert all(float(jnp.abs(g).max()) > 0 for g in cross)  # the cross-layer read carries gradient
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # noqa: E731
    close(out_h, out_r)
    jax.tree.map(close, st_h, st_r)
    # the gradients go through a different order of float sums (all chunks at once vs a scan),
    # whose rounding scales with each leaf's largest entries (up to ~40 here), not with the
    # entry compared: 1.2e-5 apart at -0.023 on one CI machine, where another gave < 5e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.abs(np.asarray(b)).max())), g_h, g_r)


def _scanned_params(params, n_layers: int, every: int):
    """Unscanned memmamba parameters (block_<l>, cross_layer_<l>) in the scanned layout
    (blocks/layers/block stacked over (groups, layers of a group), blocks/cross stacked over
    the groups of ``every`` layers)."""
    stack = lambda trees: jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)  # noqa: E731
    groups = n_layers // every
    layers = stack([stack([params[f"block_{g * every + j}"] for j in range(every)]) for g in range(groups)])
    blocks = {"layers": {"block": layers}}
    blocks["cross"] = stack([params[f"cross_layer_{g * every + every - 1}"] for g in range(groups)])
    out = {k: v for k, v in params.items() if not k.startswith(("block_", "cross_layer_"))}
    return {**out, "blocks": blocks}


@pytest.mark.parametrize("span", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_scanned_stack_equals_the_unscanned_one(span):
    """scan_layers=True runs the stack as a scan over groups of cross_layer_every layers, each
    cross-layer read attending to every layer's recorded pools with the unseen ones masked:
    with the same weights, the outputs, final states (stacked), a continuation from those
    states, and every parameter's gradient equal the unscanned model's (4 layers, a read
    every 2; all earlier pools, or the last 2 only), with overflowing pools and a reset."""
    kw = dict(**{**TINY, "n_layers": 4}, cross_layer_every=2, cross_layer_pools=span, pool_chunk=4)
    plain, scan = mnemax.create("memmamba-tiny", **kw), mnemax.create("memmamba-tiny", scan_layers=True, **kw)
    tok = _tok((2, 14), seed=7)
    resets = jnp.zeros((2, 14), bool).at[1, 9].set(True)
    w = jnp.asarray(np.random.default_rng(8).standard_normal((2, 14, 64)), jnp.float32)
    v = nn.meta.unbox(jax.jit(plain.init)(jax.random.key(0), tok))
    vs = {"params": _scanned_params(v["params"], 4, 2)}
    stacked = jax.tree.structure(nn.meta.unbox(jax.eval_shape(scan.init, jax.random.key(0), tok)))
    assert jax.tree.structure(vs) == stacked

    def loss(model, v):
        out, state = model.apply(v, tok, None, resets)
        return jnp.sum(out * w), (out, state)

    (_, (out_p, st_p)), g_p = jax.jit(jax.value_and_grad(lambda v: loss(plain, v), has_aux=True))(v)
    (_, (out_s, st_s)), g_s = jax.jit(jax.value_and_grad(lambda v: loss(scan, v), has_aux=True))(vs)
    assert max(int(s.pool.count.max()) for s in st_p.blocks) > 3  # a pool overflowed
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # noqa: E731
    close(out_s, out_p)
    jax.tree.map(close, st_s.blocks, jax.tree.map(lambda *a: jnp.stack(a), *st_p.blocks))
    more = _tok((2, 5), seed=9)
    close(jax.jit(scan.apply)(vs, more, st_s)[0], jax.jit(plain.apply)(v, more, st_p)[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-6),
                 g_s["params"], _scanned_params(g_p["params"], 4, 2))


def test_scanned_stack_needs_whole_groups():
    model = mnemax.create("memmamba-tiny", **{**TINY, "n_layers": 3}, cross_layer_every=2, scan_layers=True)
    with pytest.raises(ValueError, match="cross_layer_every >= 2 dividing n_layers"):
        jax.jit(model.init)(jax.random.key(0), _tok((1, 4)))


def test_read_history_checks_the_chunk_count():
    from mnemax.layers.note_pool import empty_pool, read_history

    hist = jax.tree.map(lambda a: jnp.stack([a] * 3), empty_pool(1, 3, 8))  # 3 chunks recorded
    q = jnp.zeros((1, 14, 2, 4))
    w = jnp.zeros((8, 2, 4))
    with pytest.raises(ValueError, match="history must hold the pools of 4 chunks of 4 steps, got 3"):
        read_history(q, (hist,), None, w, w, 4)


# Hand-built: P = 3 slots, threshold 0.5, token t's note is the one-hot e_t.
SAL = np.array([0.9, 0.2, 0.6, 0.7, 0.8, 0.65, 0.95], np.float32)
EXPECT = {
    # salience: 0.9, 0.6, 0.7 fill the pool; 0.8 replaces 0.6 (slot 1); 0.65 < min 0.7 is dropped;
    # 0.95 replaces 0.7 (slot 2)
    "salience": ([0, 4, 6], [0.9, 0.8, 0.95]),
    # oldest: the written tokens 0, 2, 3, 4, 5, 6 go round the ring; the last three stay
    "oldest": ([4, 5, 6], [0.8, 0.65, 0.95]),
}


def _hand_notes():
    T = len(SAL)
    return jnp.eye(T, dtype=jnp.float32)[None], jnp.asarray(SAL)[None], jnp.asarray(SAL > 0.5)[None]


@pytest.mark.parametrize("replace", ["salience", "oldest"])
def test_replacement_rule_on_hand_built_sequence(replace):
    values, sal, write = _hand_notes()
    tokens_want, sal_want = EXPECT[replace]
    pool = empty_pool(1, 3, len(SAL))
    insert = jax.jit(insert_note, static_argnums=4)
    for t in range(len(SAL)):  # the reference rule, one token at a time
        pool = insert(pool, values[:, t], sal[:, t], write[:, t], replace)
        assert int(pool_valid(pool).sum()) == min(int(write[0, : t + 1].sum()), 3)
    np.testing.assert_array_equal(np.argmax(np.asarray(pool.entries[0]), axis=1), tokens_want)
    np.testing.assert_allclose(np.asarray(pool.salience[0]), sal_want)
    assert int(pool.count[0]) == 6
    merge = jax.jit(merge_notes, static_argnums=4)
    for chunk in (1, 2, 3, 7):  # the per-chunk merge: same notes (FIFO and chunk 1: same slots)
        pool = empty_pool(1, 3, len(SAL))
        for lo in range(0, len(SAL), chunk):
            pool = merge(pool, values[:, lo : lo + chunk], sal[:, lo : lo + chunk], write[:, lo : lo + chunk], replace)
        got = np.argmax(np.asarray(pool.entries[0]), axis=1)
        if replace == "oldest" or chunk == 1:
            np.testing.assert_array_equal(got, tokens_want)
        else:
            assert sorted(got) == sorted(tokens_want), chunk
        assert int(pool.count[0]) == 6


@pytest.mark.parametrize("replace", ["salience", "oldest"])
def test_scans_clear_the_pool_at_a_reset(replace):
    """A reset before token 4 empties the pool: only tokens 4, 5, 6 remain (both scans)."""
    values, sal, write = _hand_notes()
    resets = jnp.zeros((1, len(SAL)), bool).at[0, 4].set(True)
    q = jnp.zeros((1, len(SAL), 1, 1))
    w_kv = jnp.zeros((len(SAL), 1, 1))
    pool0 = (empty_pool(1, 3, len(SAL)),)
    notes = (Notes(values, sal, write),)
    _, (ref,) = jax.jit(lambda: scan_reference(pool0, notes, resets, q, w_kv, w_kv, replace))()
    for chunk in (1, 3, 7):
        _, (got,) = jax.jit(lambda: scan_chunked(pool0, notes, resets, q, w_kv, w_kv, replace, chunk))()
        assert sorted(np.argmax(np.asarray(got.entries[0]), axis=1)) == [4, 5, 6] and int(got.count[0]) == 3
    np.testing.assert_array_equal(np.argmax(np.asarray(ref.entries[0]), axis=1), [4, 5, 6])


def _python_pool(notes_v, notes_s, notes_w, size, replace):
    """The replacement rule on Python lists: [(salience, value)] in slot order, notes written."""
    slots, written = [], 0
    for v, s, w in zip(notes_v, notes_s, notes_w):
        if not w:
            continue
        if replace == "oldest":
            if len(slots) < size:
                slots.append((s, v))
            else:
                slots[written % size] = (s, v)
        elif len(slots) < size:
            slots.append((s, v))
        else:
            i = min(range(size), key=lambda j: (slots[j][0], j))
            if s > slots[i][0]:
                slots[i] = (s, v)
        written += 1
    return slots, written


@pytest.mark.parametrize("replace", ["salience", "oldest"])
def test_block_pool_matches_python_loop(replace):
    """A MemMambaBlock's final pool after 40 tokens (4 slots) == the rule run on its own notes
    in a Python loop, at pool_chunk 1 and 5 (the notes of a layer do not depend on its reads);
    never more than pool_size valid slots."""
    x = _floats(16)(np.random.default_rng(5), 2, 40)
    for chunk in (1, 5):
        block = memmamba_block(pool_size=4, replace=replace, pool_chunk=chunk)
        v = jax.jit(block.init)(jax.random.key(0), x)
        (_, state), inter = jax.jit(lambda v, x: block.apply(v, x, mutable=["intermediates"]))(v, x)
        (notes,) = inter["intermediates"]["notes"]
        for b in range(2):
            slots, written = _python_pool(np.asarray(notes.values[b]), np.asarray(notes.salience[b]), np.asarray(notes.write[b]), 4, replace)
            assert written > 8 and int(state.pool.count[b]) == written and int(pool_valid(state.pool)[b].sum()) == 4
            got = sorted(zip(np.asarray(state.pool.salience[b]).tolist(), map(tuple, np.asarray(state.pool.entries[b]).tolist())))
            want = sorted((float(s), tuple(np.asarray(v).tolist())) for s, v in slots)
            np.testing.assert_allclose(np.array([g[0] for g in got]), np.array([w[0] for w in want]), rtol=1e-6)
            np.testing.assert_allclose(np.array([g[1] for g in got]), np.array([w[1] for w in want]), rtol=1e-6, atol=1e-7)
            if replace == "oldest" or chunk == 1:  # the same slots, not only the same notes
                np.testing.assert_allclose(np.asarray(state.pool.salience[b]), [s for s, _ in slots], rtol=1e-6)


def test_memmamba_block_contract():
    """The layer on the contract, with the options the defaults leave out (FIFO, gated fusion,
    MLP scorers). The gates are soft/hard: a straight-through gradient is not the gradient of
    the forward function, so the contract's finite-difference check would (rightly) reject it."""
    check_layer_contract(
        lambda **kw: memmamba_block(mixer={"backend": "reference"}, replace="oldest", fusion="gated", score_hidden=4,
                                    note_gate="soft", read_gate="hard", **kw),
        _floats(16),
    )


@pytest.mark.slow  # ~110 s on 2 cores (CI time); the block's contract stays in CI
def test_memmamba_lm_contract():
    """The LM (salience rule, cross-layer reads) on the contract, with pools large enough
    not to overflow here: the contract's finite-difference check continues a state built
    from the same tokens, so every new note ties an entry already in the pool, and at a tie
    the salience rule's choice has a kink (either side gives the same value, not the same
    slope). Replacement by salience is held to the reference (gradients included) above."""
    check_layer_contract(
        model_factory("memmamba-tiny", **{**TINY, "pool_size": 16}, backend="reference", note_gate="soft", read_gate="soft"),
        tokens(64), input_name="inputs",
    )


def test_stack_equals_the_lm_blocks():
    """The layers-level MemMambaStack on the embedded tokens == the LM's residual stream before
    its final norm (the same parameters, names block_<l> and cross_layer_<l>)."""
    tok = _tok((2, 10))
    model = mnemax.create("memmamba-tiny", **TINY, cross_layer_every=1)
    v = jax.jit(model.init)(jax.random.key(0), tok)
    (_, _), inter = jax.jit(lambda v: model.apply(v, tok, mutable=["intermediates"]))(v)
    stream = inter["intermediates"]["layer_outputs"]
    b = model.config.block
    mixer = MambaMixer(features=16, n_layers=2, **b.options_for(MambaMixer))
    stack = MemMambaStack(block=MemMambaBlock(mixer=mixer, **b.options_for(MemMambaBlock, exclude=("mixer",))),
                          cross_layer_every=b["cross_layer_every"], cross_layer_pools=b["cross_layer_pools"])
    params = {k: w for k, w in v["params"].items() if k.startswith(("block_", "cross_layer_"))}
    y, states = jax.jit(stack.apply)({"params": params}, stream[0])
    np.testing.assert_allclose(np.asarray(y), np.asarray(stream[-1]), rtol=1e-6, atol=1e-6)
    assert len(states) == 2 and states[1].pool.entries.shape == (2, 3, 8)


def test_bad_config_names_the_field():
    for field, value in (("note_gate", "sometimes"), ("replace", "random"), ("pool_impl", "fast"), ("pool_size", 0)):
        with pytest.raises(ValueError, match=field):
            memmamba_block(**{field: value}).initial_state(1)
    with pytest.raises(ValueError, match="pool_dim"):
        memmamba_block(pool_dim=7).initial_state(1)


def test_memmamba_130m_builds_without_allocating():
    """mamba-130m's backbone plus, per layer, the note scorer, summary, read norm, read scorer
    and read attention, and a cross-layer read after every 4th layer."""
    model = mnemax.create("memmamba-130m")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    d, W, n_layers = 768, 64, 24
    attention = d * W + W * W + W * W + W * d  # query, key, value, out
    per_layer = (d + 1) + d * W + d + (d + 1) + attention
    cross = (d + attention) * len(range(3, n_layers, 4))
    assert count == mamba_130m_count() + n_layers * per_layer + cross
    state = jax.eval_shape(lambda: model.initial_state(2))
    pool = state.blocks[0].pool
    assert pool.entries.shape == (2, 50, 64) and pool.salience.shape == (2, 50) and pool.count.shape == (2,)
    assert state.blocks[0].mamba.ssm.shape == (2, 1536, 16)
    assert math.isclose(model.config.block["note_threshold"], 0.5)
