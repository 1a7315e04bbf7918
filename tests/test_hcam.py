"""HCAM: the read against numpy on hand-built memories, the ring-buffer write, the
parallel path against the sequential reference, persistence, and the block contract."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.layers.hcam import HCAMAttention, HCAMBlock, HCAMState

from .contract import check_layer_contract


def np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def params_of(v):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(v["params"]))


def random_params(layer, x, seed=0, scale=0.5):
    """Initialised parameters with every array (biases too) perturbed."""
    v = jax.jit(layer.init)(jax.random.key(seed), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + scale * jnp.asarray(rng.standard_normal(a.shape), a.dtype), v)


def memory_state(contents, ordinals, pos=None):
    """An HCAMState holding the given chunks (batch, M, C, d) at the given ordinals."""
    contents = np.asarray(contents, np.float32)
    b, m, c, d = contents.shape
    ordinals = np.asarray(ordinals, np.int32)
    written = ordinals.max(axis=1) + 1
    return HCAMState(
        contents=jnp.asarray(contents),
        keys=jnp.asarray(contents.mean(axis=2)),
        slot_ordinal=jnp.asarray(ordinals),
        written=jnp.asarray(written, jnp.int32),
        accumulator=jnp.zeros((b, c, d), jnp.float32),
        pos=jnp.asarray(written * c if pos is None else pos, jnp.int32),
    )


def np_pe(c, d):
    """The reference's sinusoids: row j is position c - 1 - j, sines then cosines."""
    inv = 1e4 ** (-np.arange(0, d, 2) / d)
    ang = (c - 1 - np.arange(c))[:, None] * inv[None]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)


def np_read(p, h, contents, valid, k, heads):
    """One step's HCAM read written from the paper/reference: relevance over chunk means,
    top-k, softmax over the k, within-chunk MHA (with PE), weighted sum."""
    c, d = contents.shape[1:]
    hd = d // heads
    keys = contents.mean(axis=1)
    f = p["read_query"].shape[1]
    logits = (h @ p["read_query"]) @ (keys @ p["read_key"]).T / np.sqrt(f)
    logits = np.where(valid, logits, -np.inf)
    order = np.argsort(-logits, kind="stable")[:k]
    order = [j for j in order if valid[j]]
    if not order:
        return np.zeros(d), [], np.zeros(0)
    w = np_softmax(logits[order])
    out = np.zeros(d)
    for wj, j in zip(w, order):
        aug = contents[j] + np_pe(c, d)
        heads_out = []
        for hh in range(heads):
            q = h @ p["mem_query"][:, hh] + p["mem_query_bias"][hh]
            kk = aug @ p["mem_key"][:, hh] + p["mem_key_bias"][hh]
            vv = aug @ p["mem_value"][:, hh] + p["mem_value_bias"][hh]
            heads_out.append(np_softmax(kk @ q / np.sqrt(hd)) @ vv)
        o = np.einsum("he,hef->f", np.stack(heads_out), p["mem_out"]) + p["mem_out_bias"]
        out += wj * o
    return out, order, w


def np_rope(x, position, base=10000.0):
    """Rotary positions (Su et al.) of one head's vector x (hd,), rotate-half layout: feature
    i (< hd/2) pairs with feature i + hd/2 and the pair turns by position * base^(-2i/hd)."""
    half = x.shape[-1] // 2
    theta = position * base ** (-2.0 * np.arange(half) / x.shape[-1])
    x1, x2 = x[:half], x[half:]
    return np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta), x2 * np.cos(theta) + x1 * np.sin(theta)])


def np_local(p, chunk, heads):
    """Local attention of a chunk's newest step: chunk (n + 1, d) is the accumulator (the
    chunk's first n steps) then the step itself; causal MHA over the n + 1 steps with RoPE
    at the within-chunk offsets 0 .. n, scale 1/sqrt(head_dim), no biases."""
    n = chunk.shape[0] - 1
    d = chunk.shape[1]
    hd = d // heads
    out = np.zeros(d)
    for hh in range(heads):
        q = np_rope(chunk[n] @ p["local_query"][:, hh], n)
        keys = np.stack([np_rope(chunk[i] @ p["local_key"][:, hh], i) for i in range(n + 1)])
        values = chunk @ p["local_value"][:, hh]
        out += (np_softmax(keys @ q / np.sqrt(hd)) @ values) @ p["local_out"][hh]
    return out


def np_fresh_row():
    return {"memory": [], "acc": [], "written": 0, "pos": 0}


def np_hcam(p, xs, resets, rows, c, m, k, heads):
    """The whole layer (persist_across_resets=False) as a plain loop over steps, from the
    module docstring: a reset starts a fresh row; step t reads the memory of complete
    chunks (np_read over the last M written), adds local attention within its own chunk,
    then joins the accumulator, which is written to the memory when it holds C steps.
    ``rows`` (one dict per batch row) is updated in place. Returns (y, local part,
    number of chunks in memory at each step)."""
    b, t_len, d = xs.shape
    y, local, n_mem = np.zeros((b, t_len, d)), np.zeros((b, t_len, d)), np.zeros((b, t_len), int)
    for r in range(b):
        for t in range(t_len):
            if resets[r, t]:
                rows[r] = np_fresh_row()
            s, h = rows[r], xs[r, t]
            chunks = [chunk for _, chunk in s["memory"]]
            read = np.zeros(d)
            if chunks:
                read = np_read(p, h, np.stack(chunks), np.ones(len(chunks), bool), k, heads)[0]
            local[r, t] = np_local(p, np.stack(s["acc"] + [h]), heads)
            y[r, t], n_mem[r, t] = read + local[r, t], len(chunks)
            s["acc"].append(h)
            s["pos"] += 1
            if len(s["acc"]) == c:
                s["memory"] = (s["memory"] + [(s["written"], np.stack(s["acc"]))])[-m:]
                s["written"] += 1
                s["acc"] = []
    return y, local, n_mem


def np_state(rows, c, m, d):
    """The HCAMState layout of the numpy rows (slot = ordinal mod M)."""
    b = len(rows)
    contents, ordinals = np.zeros((b, m, c, d)), np.full((b, m), -1)
    acc = np.zeros((b, c, d))
    for r, s in enumerate(rows):
        for ordinal, chunk in s["memory"]:
            contents[r, ordinal % m], ordinals[r, ordinal % m] = chunk, ordinal
        if s["acc"]:
            acc[r, : len(s["acc"])] = np.stack(s["acc"])
    return HCAMState(
        contents=contents, keys=contents.mean(axis=2), slot_ordinal=ordinals,
        written=np.array([s["written"] for s in rows]), accumulator=acc, pos=np.array([s["pos"] for s in rows]),
    )


def test_chunk_size_one_and_k_equal_m_is_softmax_attention():
    """C = 1, k = M: the read is softmax attention over the stored steps, with query
    W_q^read, keys W_k^read m_j and values W_o (W_v (m_j + PE_0) + b_v) + b_o -- on a
    hand-built memory, and over a fresh sequence (causal attention to the previous M
    steps, the ring buffer's window)."""
    rng = np.random.default_rng(0)
    b, m, d, heads = 2, 5, 8, 2
    layer = HCAMAttention(features=d, num_heads=heads, chunk_size=1, num_chunks=m, top_k=m, local_attention=False)
    x = jnp.asarray(rng.standard_normal((b, 1, d)), jnp.float32)
    v = random_params(layer, x)
    p = params_of(v)
    mem = rng.standard_normal((b, m, 1, d))
    state = memory_state(mem, np.tile(np.arange(m), (b, 1)))
    y, _ = jax.jit(layer.apply)(v, x, state)

    pe0 = np.concatenate([np.zeros(d // 2), np.ones(d // 2)])  # position 0: sin 0, cos 0
    values = np.einsum("bmd,dhe->bmhe", mem[:, :, 0] + pe0, p["mem_value"]) + p["mem_value_bias"]
    values = np.einsum("bmhe,hef->bmf", values, p["mem_out"]) + p["mem_out_bias"]
    q = np.asarray(x[:, 0], np.float64) @ p["read_query"]
    k = mem[:, :, 0] @ p["read_key"]
    att = np_softmax(np.einsum("bf,bmf->bm", q, k) / np.sqrt(d))
    np.testing.assert_allclose(np.asarray(y[:, 0]), np.einsum("bm,bmf->bf", att, values), rtol=1e-4, atol=1e-5)

    # Fresh sequence: step t attends to steps t - M .. t - 1 (none at t = 0).
    t_len = 9
    xs = rng.standard_normal((b, t_len, d))
    y, _ = jax.jit(layer.apply)(v, jnp.asarray(xs, jnp.float32))
    vals = np.einsum("btd,dhe->bthe", xs + pe0, p["mem_value"]) + p["mem_value_bias"]
    vals = np.einsum("bthe,hef->btf", vals, p["mem_out"]) + p["mem_out_bias"]
    logits = np.einsum("btf,bsf->bts", xs @ p["read_query"], xs @ p["read_key"]) / np.sqrt(d)
    for t in range(t_len):
        lo = max(0, t - m)
        want = np.zeros((b, d)) if t == 0 else np.einsum("bs,bsf->bf", np_softmax(logits[:, t, lo:t]), vals[:, lo:t])
        np.testing.assert_allclose(np.asarray(y[:, t]), want, rtol=1e-4, atol=1e-5)


def test_top_k_selection_and_relevance_weighting_on_a_hand_built_memory():
    """Chunk keys built so that the query's top 2 of 4 are chunks 3 then 1 (and one row
    with a single valid chunk); the read equals the numpy read, whose selection and
    weights are checked against the design."""
    rng = np.random.default_rng(1)
    d, c, m, k, heads = 4, 2, 4, 2, 2
    layer = HCAMAttention(features=d, num_heads=heads, chunk_size=c, num_chunks=m, top_k=k, local_attention=False)
    h = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    x = jnp.asarray(h[:, None], jnp.float32)
    v = random_params(layer, x, seed=1)
    # identity relevance projections: logits = h . mean(chunk) / 2
    v = jax.tree.map(lambda a: a, v)
    params = nn.meta.unbox(v["params"])
    params = {**params, "read_query": jnp.eye(d), "read_key": jnp.eye(d)}
    v = {"params": params}
    p = params_of(v)
    means = np.array([[0.5, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    noise = rng.standard_normal((m, c, d))
    contents = means[:, None, :] + noise - noise.mean(axis=1, keepdims=True)  # exact means, varied steps
    contents = np.stack([contents, contents])
    ordinals = np.array([[0, 1, 2, 3], [0, -1, -1, -1]])  # row 1: only chunk 0 is in memory
    state = memory_state(contents, ordinals, pos=np.array([8, 2]))
    y, _ = jax.jit(layer.apply)(v, x, state)

    want0, order0, w0 = np_read(p, h[0], contents[0], ordinals[0] >= 0, k, heads)
    assert order0 == [3, 1]
    np.testing.assert_allclose(w0, np_softmax(np.array([3.0, 2.0]) / 2))  # logits h.k / sqrt(4)
    want1, order1, w1 = np_read(p, h[1], contents[1], ordinals[1] >= 0, k, heads)
    assert order1 == [0] and np.allclose(w1, [1.0])
    np.testing.assert_allclose(np.asarray(y[:, 0]), np.stack([want0, want1]), rtol=1e-4, atol=1e-5)
    # an empty memory reads zero
    y, _ = jax.jit(layer.apply)(v, x, memory_state(contents, np.full((2, m), -1), pos=np.array([0, 0])))
    np.testing.assert_allclose(np.asarray(y), 0.0, atol=1e-7)


def test_memory_write_fills_and_wraps_the_ring_buffer():
    d, c, m = 3, 2, 3
    layer = HCAMAttention(features=d, num_heads=1, chunk_size=c, num_chunks=m, top_k=1, local_attention=False)
    steps = np.arange(13, dtype=np.float32)
    x = np.stack([steps, -steps, steps**2 / 10], axis=-1)[None]  # step t is (t, -t, t^2/10)
    v = jax.jit(layer.init)(jax.random.key(0), jnp.asarray(x))
    run = jax.jit(layer.apply)

    _, s = run(v, jnp.asarray(x[:, :5]))  # chunks (0,1), (2,3); step 4 in the accumulator
    assert list(np.asarray(s.slot_ordinal[0])) == [0, 1, -1] and int(s.written[0]) == 2 and int(s.pos[0]) == 5
    np.testing.assert_allclose(np.asarray(s.contents[0, 1]), x[0, 2:4])
    np.testing.assert_allclose(np.asarray(s.keys[0, 0]), x[0, 0:2].mean(0))
    np.testing.assert_allclose(np.asarray(s.contents[0, 2]), 0.0)
    np.testing.assert_allclose(np.asarray(s.accumulator[0]), np.stack([x[0, 4], np.zeros(d)]))

    _, s = run(v, jnp.asarray(x))  # 6 chunks written, the last 3 kept: ordinals 3, 4, 5
    assert list(np.asarray(s.slot_ordinal[0])) == [3, 4, 5] and int(s.written[0]) == 6
    for slot, ordinal in enumerate([3, 4, 5]):
        np.testing.assert_allclose(np.asarray(s.contents[0, slot]), x[0, 2 * ordinal : 2 * ordinal + 2])
        np.testing.assert_allclose(np.asarray(s.keys[0, slot]), x[0, 2 * ordinal : 2 * ordinal + 2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.accumulator[0, 0]), x[0, 12])
    # the same state when fed one step at a time
    state = None
    for t in range(13):
        _, state = run(v, jnp.asarray(x[:, t : t + 1]), state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("persist", [False, True])
def test_parallel_equals_sequential_reference(persist):
    """Random inputs with resets mid-chunk, in one call and in pieces with the state
    carried: the parallel path equals the lax.scan reference (outputs and state)."""
    rng = np.random.default_rng(2)
    b, t, d = 2, 19, 8
    kw = dict(features=d, num_heads=2, chunk_size=3, num_chunks=2, top_k=2, persist_across_resets=persist)
    par, seq = HCAMAttention(**kw), HCAMAttention(**kw, impl="sequential")
    x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    resets = np.zeros((b, t), bool)
    resets[0, 11] = resets[1, 4] = resets[1, 14] = True
    resets = jnp.asarray(resets)
    v = random_params(par, x, scale=0.3)
    want_y, want_s = jax.jit(seq.apply)(v, x, None, resets)
    run = jax.jit(par.apply)
    y1, s1 = run(v, x[:, :8], None, resets[:, :8])
    y2, s2 = run(v, x[:, 8:], s1, resets[:, 8:])
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(want_y), rtol=1e-4, atol=1e-5)
    for a, w in zip(jax.tree.leaves(s2), jax.tree.leaves(want_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5, atol=1e-6)
    if persist:
        # memory carried over the reset: row 1's second episode has chunks of both
        assert int(want_s.written[1]) == (4 // 3) + (10 // 3) + (5 // 3)
    else:
        assert int(want_s.written[1]) == 5 // 3


@pytest.mark.parametrize("impl", ["parallel", "sequential"])
def test_local_attention_and_read_match_numpy_loop(impl):
    """The whole layer (local attention on, memory read, C = 3, M = 3 chunks, top 2)
    against the numpy loop of np_hcam, over two calls with the state carried: row 0
    resets mid-chunk in the first call (step 4) and ends it with one step in the
    accumulator; row 1 ends it with two and resets mid-chunk in the second call; the
    ring buffer wraps in both rows. Outputs and the state after each call."""
    rng = np.random.default_rng(11)
    b, t_len, d, heads, c, m, k = 2, 11, 8, 2, 3, 3, 2
    layer = HCAMAttention(features=d, num_heads=heads, chunk_size=c, num_chunks=m, top_k=k, impl=impl)
    xs = rng.standard_normal((b, 2 * t_len, d)).astype(np.float32)
    resets = np.zeros((b, 2 * t_len), bool)
    resets[0, 4] = resets[1, t_len + 6] = True
    # every parameter (biases too) N(0, 0.4^2), built from the shapes (no init compile)
    shapes = jax.eval_shape(layer.init, jax.random.key(0), jax.ShapeDtypeStruct((b, 1, d), jnp.float32))
    v = jax.tree.map(lambda s: jnp.asarray(0.4 * rng.standard_normal(s.shape), jnp.float32), shapes)
    p = params_of(v)
    run = jax.jit(layer.apply)  # one compile: both calls get a state and resets
    state = layer.initial_state(b)
    rows = [np_fresh_row() for _ in range(b)]
    for call in range(2):
        sl = slice(call * t_len, (call + 1) * t_len)
        y, state = run(v, jnp.asarray(xs[:, sl]), state, jnp.asarray(resets[:, sl]))
        want, local, n_mem = np_hcam(p, xs[:, sl].astype(np.float64), resets[:, sl], rows, c, m, k, heads)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=2e-6)  # measured 5e-7 (|y| ~ 4)
        for got, ref in zip(state, np_state(rows, c, m, d)):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)
        assert (n_mem > k).any()  # top-k leaves chunks out
        assert np.abs(local).mean() > 0.3 * np.abs(want - local).mean() > 0.05  # both parts count
        if call == 0:
            assert [len(r["acc"]) for r in rows] == [1, 2]  # the second call starts mid-chunk
    assert [r["written"] for r in rows] == [6, 1] and [r["pos"] for r in rows] == [18, 5]


def test_stop_gradient_on_memory():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 4, 4)), jnp.float32)
    state = memory_state(rng.standard_normal((1, 3, 2, 4)), [[0, 1, 2]])
    layer = HCAMAttention(features=4, num_heads=1, chunk_size=2, num_chunks=3, top_k=2, local_attention=False)
    v = jax.jit(layer.init)(jax.random.key(0), x)

    def loss(inputs, contents, keys):
        return jnp.sum(layer.apply(v, inputs, state._replace(contents=contents, keys=keys))[0] ** 2)

    g_x, g_contents, g_keys = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, state.contents, state.keys)
    assert float(jnp.abs(g_contents).max()) == 0.0 and float(jnp.abs(g_keys).max()) == 0.0
    assert float(jnp.abs(g_x).max()) > 0.0  # the query path still learns
    # (with stop_gradient_memory=False the memory gradients are checked against finite
    # differences by the contract test below)


def test_hcam_block_contract():
    """The contract (with the stop-gradient off: with it on, gradients deliberately
    differ from finite differences through the memory)."""
    check_layer_contract(
        lambda name=None, **kw: HCAMBlock(
            hcam=HCAMAttention(features=8, num_heads=2, chunk_size=3, num_chunks=2, top_k=2, stop_gradient_memory=False,
                               parent=None, **kw),
            mlp_ratio=1.0, name=name,
        ),
        lambda rng, b, t: jnp.asarray(rng.standard_normal((b, t, 8)), jnp.float32),
    )


# The HCAM presets as written in zoo/families/hcam.py: d_model, n_layers, vocab, heads, the
# SwiGLU MLP's hidden width round(mlp_ratio * d), tied embeddings.
HCAM_PRESETS = {
    "hcam-tiny": dict(d=32, layers=2, vocab=64, heads=2, hidden=64, tied=False),
    "hcam-small": dict(d=256, layers=4, vocab=256, heads=4, hidden=1024, tied=False),
    "hcam-125m": dict(d=768, layers=8, vocab=50304, heads=12, hidden=2048, tied=True),
}


def hcam_model_shapes(d, layers, vocab, heads, hidden, tied, key_size=None):
    """Parameter shapes of an HCAM LM (zoo/model.py: embed -> HCAMBlocks -> RMSNorm -> LM
    head without bias, none when tied), each block ``attn_norm -> HCAMAttention ->
    mlp_norm -> SwiGLU MLP`` (no biases) and HCAMAttention's documented layout: relevance
    projections W_q, W_k (d, F); the within-chunk MHA's q/k/v/out with biases; the local
    attention's q/k/v/out without."""
    f, hd = key_size or d, d // heads
    block = {"attn_norm/scale": (d,), "mlp_norm/scale": (d,), "hcam/read_query": (d, f), "hcam/read_key": (d, f),
             "hcam/mem_out": (heads, hd, d), "hcam/mem_out_bias": (d,), "hcam/local_out": (heads, hd, d),
             "mlp/up/kernel": (d, hidden), "mlp/gate/kernel": (d, hidden), "mlp/down/kernel": (hidden, d)}
    for n in ("query", "key", "value"):
        block |= {f"hcam/mem_{n}": (d, heads, hd), f"hcam/mem_{n}_bias": (heads, hd), f"hcam/local_{n}": (d, heads, hd)}
    shapes = {"embed/embedding": (vocab, d), "final_norm/scale": (d,)}
    if not tied:
        shapes["head/kernel"] = (d, vocab)
    for i in range(layers):
        shapes |= {f"block_{i}/{name}": shape for name, shape in block.items()}
    return shapes


def hcam_model_count(d, layers, vocab, heads, hidden, tied, key_size=None):
    """The count by arithmetic: per block 2 d F (relevance) + 4 d^2 + 4 d (within-chunk
    MHA with biases) + 4 d^2 (local MHA) + 3 d hidden (SwiGLU) + 2 d (norms)."""
    f = key_size or d
    per_block = 2 * d * f + 4 * d * d + 4 * d + 4 * d * d + 3 * d * hidden + 2 * d
    return vocab * d + layers * per_block + d + (0 if tied else d * vocab)


def flat_shapes(tree):
    """{'a/b/c': shape} of a params tree (boxes unwrapped)."""
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(a.shape) for path, a in leaves}


@pytest.mark.parametrize("name", sorted(HCAM_PRESETS))
def test_hcam_preset_parameter_count_and_shapes(name):
    """Each preset's parameters: the shapes of the documented layout, and a count equal
    to the closed-form formula (hcam-125m: 123,605,760, the "~125M" of its comment)."""
    spec = HCAM_PRESETS[name]
    model = mnemax.create(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32))
    got = flat_shapes(shapes["params"])
    count = sum(int(np.prod(s)) for s in got.values())
    assert count == hcam_model_count(**spec)
    assert got == hcam_model_shapes(**spec)
    if name == "hcam-125m":
        assert count == 123_605_760
    if name == "hcam-tiny":  # key_size F = 8 changes only the relevance projections: 2 d (d - F) fewer per layer
        keyed = jax.eval_shape(mnemax.create(name, key_size=8).init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 4), jnp.int32))
        got = flat_shapes(keyed["params"])
        assert sum(int(np.prod(s)) for s in got.values()) == hcam_model_count(**spec, key_size=8)
        assert got == hcam_model_shapes(**spec, key_size=8)
        assert hcam_model_count(**spec, key_size=8) == count - 2 * (2 * 32 * (32 - 8))
    cfg = mnemax.get_config(name)
    assert cfg.block["stop_gradient_memory"] and not cfg.block["persist_across_resets"]
