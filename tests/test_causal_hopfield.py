"""The causal Hopfield mixer and blocks (:mod:`mnemax.layers.causal_hopfield`): set Hopfield
over a ring buffer of the episode's past patterns, against numpy written here, and on the
layer contract."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.layers.causal_hopfield import CausalHopfield, CausalHopfieldBlock
from mnemax.layers.hopfield import Hopfield, HopfieldPooling

from .contract import check_layer_contract
from .test_hopfield import jinit, jrun, np_layer_norm, np_softmax, unbox


def _ring_buffer_mask(resets, m: int, include_current: bool):
    """allowed[b, t, s]: step t of row b may retrieve step s's pattern (the last m steps of its
    episode before t, or up to t)."""
    batch, time = resets.shape
    allowed = np.zeros((batch, time, time), bool)
    for b in range(batch):
        start = 0
        for t in range(time):
            start = t if resets[b, t] else start
            hi = t + 1 if include_current else t
            allowed[b, t, max(start, hi - m) : hi] = True
    return allowed


@pytest.mark.parametrize("include_current", [False, True])
def test_causal_hopfield_is_set_hopfield_over_the_ring_buffer(include_current):
    """Step t retrieves with the set layer (same parameters) from the last M steps before
    t (or up to t); resets restart the memory; an empty memory outputs the bias."""
    rng = np.random.default_rng(8)
    batch, time, f, m = 2, 10, 8, 3
    x = jnp.asarray(rng.standard_normal((batch, time, f)), jnp.float32)
    resets = np.zeros((batch, time), bool)
    resets[1, 6] = True
    layer = CausalHopfield(features=f, num_heads=2, memory_size=m, include_current=include_current, update_steps_max=2)
    v = jinit(layer, 0, x)
    y, state = jax.jit(layer.apply)(v, x, None, jnp.asarray(resets))
    allowed = _ring_buffer_mask(resets, m, include_current)
    setwise = Hopfield(num_heads=2, update_steps_max=2)
    want = jax.jit(setwise.apply)(v, x, x, association_mask=jnp.asarray(allowed)[:, None])
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-5)
    bias = np.asarray(nn.meta.unbox(v["params"])["out_proj"]["bias"])
    empty = ~allowed.any(-1)
    assert empty.sum() == (0 if include_current else 3)  # first steps of the 3 episodes
    np.testing.assert_allclose(np.asarray(y)[empty], np.broadcast_to(bias, (empty.sum(), f)), atol=1e-6)
    # The state holds the last m patterns of the last episode, at slot = position % m.
    k_all = np.einsum("btf,fhe->bthe", np.asarray(nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False).apply({}, x)),
                      np.asarray(nn.meta.unbox(v["params"])["stored_proj"]["kernel"]))
    k_all = k_all * 1.0 + np.asarray(nn.meta.unbox(v["params"])["stored_proj"]["bias"])
    assert list(np.asarray(state.slot_pos[1])) == [3, 1, 2]  # positions 1..3 after the reset at 6
    np.testing.assert_allclose(np.asarray(state.k[1, 0]), k_all[1, 9], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.k[0, 9 % m]), k_all[0, 9], rtol=1e-5, atol=1e-6)


def test_causal_hopfield_key_conv_convolves_only_the_stored_patterns():
    """With ``key_conv`` the stored patterns come from a causal depthwise conv of x (numpy
    loop here, restarting at resets); state patterns and projections stay x; the set layer
    over the ring buffer then gives the same outputs. Streaming carries the conv's inputs."""
    rng = np.random.default_rng(10)
    batch, time, f, m, width = 2, 11, 8, 4, 3
    x = jnp.asarray(rng.standard_normal((batch, time, f)), jnp.float32)
    resets = np.zeros((batch, time), bool)
    resets[1, 5] = True
    layer = CausalHopfield(features=f, num_heads=2, memory_size=m, key_conv=width, update_steps_max=1,
                           kernel_init=nn.initializers.normal(0.3))
    v = jinit(layer, 0, x)
    y, _ = jax.jit(layer.apply)(v, x, None, jnp.asarray(resets))
    p = nn.meta.unbox(v["params"])["key_conv"]
    w, b = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
    assert w.shape == (width, f)
    xn = np.asarray(x, np.float64)
    xk = np.zeros_like(xn)
    for r in range(batch):
        for t in range(time):
            start = max([s for s in range(t + 1) if resets[r, s]] or [0])
            xk[r, t] = b + sum(w[j] * xn[r, t - width + 1 + j] for j in range(width) if t - width + 1 + j >= start)
    allowed = np.zeros((batch, time, time), bool)
    for r in range(batch):
        start = 0
        for t in range(time):
            start = t if resets[r, t] else start
            allowed[r, t, max(start, t - m) : t] = True
    setwise = jax.jit(Hopfield(num_heads=2, update_steps_max=1).apply)
    mask = jnp.asarray(allowed)[:, None]
    want = np.asarray(setwise(v, x, jnp.asarray(xk, jnp.float32), x, association_mask=mask))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
    # without the conv the outputs differ (the comparison can tell the two apart)
    plain = np.asarray(setwise(v, x, x, x, association_mask=mask))
    assert np.abs(plain - want).max() > 0.05 * np.abs(want).max()
    with pytest.raises(ValueError, match="key_conv"):
        CausalHopfield(features=f, num_heads=2, key_conv=-1).initial_state(1)


def test_causal_hopfield_pooling_is_hopfield_pooling_of_the_prefix():
    """Learned queries pool the episode so far (row 1 restarts at a reset at step 5);
    the memory (5 steps) limits how far back."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((2, 10, 8)), jnp.float32)
    layer = CausalHopfield(features=8, num_heads=2, num_queries=2, include_current=True, memory_size=5)
    v = jinit(layer, 0, x)
    resets = jnp.zeros((2, 10), bool).at[1, 5].set(True)
    y, _ = jax.jit(layer.apply)(v, x, None, resets)
    p = nn.meta.unbox(v["params"])
    pool = HopfieldPooling(num_heads=2, quantity=2, disable_out_projection=True)
    rest = {"params": {k: a for k, a in p.items() if k != "out_proj"}}
    mask = np.zeros((2, 10, 10), bool)  # step t of row b pools steps [lo, t]
    for b in range(2):
        for t in range(10):
            start = 5 if (b == 1 and t >= 5) else 0
            mask[b, t, max(start, t - 4) : t + 1] = True
    # every step's pooling as one masked set call: (batch * time) sets of 10 patterns
    xs = jnp.repeat(x, 10, axis=0)
    heads = jrun(pool, rest, xs, stored_pattern_mask=jnp.asarray(mask.reshape(20, 10)))
    heads = np.asarray(heads).reshape(2, 10, 2, 2, 4)  # (batch, time, Q, H, pd)
    want = np.einsum("btqhd,qhdf->btf", heads, p["out_proj"]["kernel"]) + p["out_proj"]["bias"]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("include_current,num_queries", [(False, None), (True, None), (True, 2)],
                         ids=["strict", "include_current", "pooling"])
def test_causal_hopfield_query_blocks_equal_the_dense_association(include_current, num_queries):
    """Past T > M + query_block the queries go in blocks, each scored only against the keys
    its window reaches. A fresh call with resets, and a call that continues from a cached
    state (its blocks also see the cached slots): outputs, final state and the gradients of
    the parameters and of x equal the dense association's (query_block=None); the fresh
    call also equals the set layer over the ring buffer (an independent reference)."""
    rng = np.random.default_rng(12)
    batch, time, f, m, first = 2, 23, 8, 3, 6
    x = jnp.asarray(rng.standard_normal((batch, time, f)), jnp.float32)
    resets = np.zeros((batch, time), bool)
    resets[0, 3] = resets[1, 14] = True
    w = jnp.asarray(rng.standard_normal((batch, time, f)), jnp.float32)
    kw = dict(features=f, num_heads=2, memory_size=m, include_current=include_current, num_queries=num_queries,
              update_steps_max=1, kernel_init=nn.initializers.normal(0.3))
    blocked, dense = CausalHopfield(query_block=2, **kw), CausalHopfield(query_block=None, **kw)
    v = jinit(dense, 0, x)

    def run(layer, params, xs, rs, state):
        return layer.apply({"params": params}, xs, state, rs)

    def loss(layer, params, xs):  # fresh call over steps [first, time); then continued from steps [0, first)
        y, s = run(layer, params, xs, jnp.asarray(resets), None)
        _, s1 = run(dense, params, xs[:, :first], jnp.asarray(resets[:, :first]), None)
        y2, s2 = run(layer, params, xs[:, first:], jnp.asarray(resets[:, first:]), s1)
        return jnp.sum(y * w) + jnp.sum(y2 * w[:, first:]), (y, s, y2, s2)

    params = v["params"]
    (lb, auxb), gb = jax.jit(jax.value_and_grad(lambda p, xs: loss(blocked, p, xs), (0, 1), has_aux=True))(params, x)
    (ld, auxd), gd = jax.jit(jax.value_and_grad(lambda p, xs: loss(dense, p, xs), (0, 1), has_aux=True))(params, x)
    for a, b in zip(jax.tree.leaves(auxb) + jax.tree.leaves(gb), jax.tree.leaves(auxd) + jax.tree.leaves(gd)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # the continued call is the fresh call's tail (streaming), so the cached slots were used
    np.testing.assert_allclose(np.asarray(auxb[2]), np.asarray(auxb[0])[:, first:], rtol=1e-4, atol=1e-5)
    if num_queries is None:
        allowed = _ring_buffer_mask(resets, m, include_current)
        want = Hopfield(num_heads=2, update_steps_max=1).apply(v, x, x, association_mask=jnp.asarray(allowed)[:, None])
        np.testing.assert_allclose(np.asarray(auxb[0]), np.asarray(want), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="query_block must be a positive integer or None"):
        CausalHopfield(features=f, num_heads=2, query_block=0).initial_state(1)


def float_input(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make


# key_conv 3 runs the same Hopfield memory behind a causal key conv; the plain one's
# contract runs with -m slow
@pytest.mark.parametrize("key_conv", [pytest.param(0, marks=pytest.mark.slow), 3])
def test_causal_hopfield_contract(key_conv):
    check_layer_contract(
        lambda **kw: CausalHopfield(features=8, num_heads=2, memory_size=4, update_steps_max=1, key_conv=key_conv,
                                    kernel_init=nn.initializers.normal(0.3), **kw),
        float_input(8),
    )


def np_rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_hopfield_classifier(p, tok, resets, m, heads):
    """hopfield-small's layout with numpy: embedding; a causal Hopfield block (LayerNorms
    of state/stored/projected patterns, per-head projections with biases, softmax(beta
    q k^T) v over the last m steps of the episode strictly before t, output projection,
    residual; then x + SwiGLU(RMSNorm(x))); a Hopfield pooling block (the learned query
    pattern, LayerNormed and projected, pools the last m steps up to and including t; no
    residual); the final RMSNorm; the classifier head with bias. beta = 1/sqrt(head_dim)."""
    x = p["embed"]["embedding"][tok]  # (batch, time, d)
    batch, time, d = x.shape
    hd = d // heads
    beta = 1 / np.sqrt(hd)

    def proj(a, pp, name):
        return np.einsum("...d,dhe->...he", a, pp[name]["kernel"]) + pp[name]["bias"]

    def retrieve(queries, keys, values, allowed):
        """queries (batch, time, Q, H, hd) -> (batch, time, Q, H, pd); zeros where nothing is allowed."""
        out = np.zeros(queries.shape[:-1] + (values.shape[-1],))
        for b in range(batch):
            for t in range(time):
                idx = np.nonzero(allowed[b, t])[0]
                for h in range(heads):
                    for qi in range(queries.shape[2]):
                        if idx.size:
                            xi = np_softmax(beta * keys[b, idx, h] @ queries[b, t, qi, h])
                            out[b, t, qi, h] = xi @ values[b, idx, h]
        return out

    hop = p["block_0"]["hopfield"]
    q = proj(np_layer_norm(x, hop, "norm_state"), hop, "state_proj")[:, :, None]
    k = proj(np_layer_norm(x, hop, "norm_stored"), hop, "stored_proj")
    v = proj(np_layer_norm(x, hop, "norm_projection"), hop, "projection_proj")
    z = retrieve(q, k, v, _ring_buffer_mask(resets, m, include_current=False))[:, :, 0]
    x = x + np.einsum("bthe,hef->btf", z, hop["out_proj"]["kernel"]) + hop["out_proj"]["bias"]
    mlp = p["block_0"]["mlp"]
    n = np_rms_norm(x, p["block_0"]["mlp_norm"]["scale"])
    gate = n @ mlp["gate"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (n @ mlp["up"]["kernel"])) @ mlp["down"]["kernel"]

    pool = p["block_1"]["pool"]
    queries = proj(np_layer_norm(pool["pooling_weights"], pool, "norm_state"), pool, "state_proj")  # (Q, H, hd)
    queries = np.broadcast_to(queries, (batch, time) + queries.shape)
    k = proj(np_layer_norm(x, pool, "norm_stored"), pool, "stored_proj")
    v = proj(np_layer_norm(x, pool, "norm_projection"), pool, "projection_proj")
    pooled = retrieve(queries, k, v, _ring_buffer_mask(resets, m, include_current=True))
    y = np.einsum("btqhe,qhef->btf", pooled, pool["out_proj"]["kernel"]) + pool["out_proj"]["bias"]
    y = np_rms_norm(y, p["final_norm"]["scale"])
    return y @ p["head"]["kernel"] + p["head"]["bias"]


def test_hopfield_pooling_classifier_streams():
    """hopfield-small's layout (a self-association block, then a pooling block) at tiny
    size, with every parameter perturbed, equals the numpy forward of
    np_hopfield_classifier: each step's logits are the head applied to a Hopfield pooling
    of the last 6 steps of its episode (row 1 resets at step 5). One call == two pieces
    with the state carried."""
    m = 6  # < 8 steps: the window limits the pooling
    model = mnemax.create("hopfield-small", d_model=8, n_layers=2, num_heads=2, memory_size=m, vocab_size=16, mlp_ratio=1.0)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 16, (2, 8))
    resets = np.zeros((2, 8), bool)
    resets[1, 5] = True
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 8), jnp.int32))
    v = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)  # norms, biases too
    run = jax.jit(model.apply)
    tok_j, resets_j = jnp.asarray(tok, jnp.int32), jnp.asarray(resets)
    state0 = model.initial_state(2)  # given to both first calls: two compiles, not three
    y, s = run(v, tok_j, state0, resets_j)
    assert y.shape == (2, 8, 10)
    want = np_hopfield_classifier(unbox(v["params"]), tok, resets, m, heads=2)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1.5e-6)  # measured 3e-7 (|y| ~ 4)
    y1, s1 = run(v, tok_j[:, :4], state0, resets_j[:, :4])
    y2, s2 = run(v, tok_j[:, 4:], s1, resets_j[:, 4:])
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(y), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_hopfield_block_is_hopfield_then_mlp():
    """The block is x + CausalHopfield(x) then x + MLP(RMSNorm(x))."""
    from mnemax.layers import MLP, RMSNorm

    block = CausalHopfieldBlock(hopfield=CausalHopfield(features=8, num_heads=2, memory_size=4))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 8)), jnp.float32)
    bv = jinit(block, 0, x)
    p = bv["params"]

    @jax.jit
    def by_hand(p, x):
        h, _ = CausalHopfield(features=8, num_heads=2, memory_size=4).apply({"params": p["hopfield"]}, x)
        x1 = x + h
        n, _ = RMSNorm().apply({"params": p["mlp_norm"]}, x1)
        return x1 + MLP(hidden=32).apply({"params": p["mlp"]}, n)[0]

    np.testing.assert_allclose(np.asarray(jrun(block, bv, x)[0]), np.asarray(by_hand(p, x)), rtol=1e-5, atol=1e-6)
    cfg = mnemax.get_config("hopfield-small")
    assert cfg.head == "classify" and cfg.block["pool_last"]
    assert "hopfield-tiny" in mnemax.list_models()
