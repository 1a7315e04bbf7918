"""xLSTM layers, blocks, stack and language models on the layer contract, plus the
properties the contract does not cover (block placement, initialisation, configs)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.layers import (
    MLSTMBlock,
    MLSTMLargeLayer,
    MLSTMLayer,
    SLSTMBlock,
    SLSTMLayer,
    XLSTMLargeBlock,
    XLSTMStack,
)
from mnemax.layers.xlstm_cells import powerlaw_forget_bias

from .contract import check_layer_contract
from .test_models import model_factory, tokens


def float_input(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make


def holding(block_cls, field, layer_cls, block_kw=None, **layer_kw):
    """A factory of ``block_cls`` holding ``layer_cls(**layer_kw)`` as ``field``: ``name`` goes
    to the block, every other keyword (dtype, chunk_size, ...) to its layer."""

    def make(name=None, **kw):
        return block_cls(**{field: layer_cls(**layer_kw, **kw, parent=None)}, **(block_kw or {}), name=name)

    return make


# Small configs. The contract runs at the default chunk size (its 11-step sequences fit
# in one chunk); the streaming checks below pass chunk_size=4 where the module has one, so
# that calls span several chunks (with padding) and the chunkwise state carry is used
# inside the layers.
MODULES = {
    "mlstm_layer": (lambda **kw: MLSTMLayer(features=16, num_heads=2, round_to=8, **kw), 16),
    "slstm_layer": (lambda **kw: SLSTMLayer(features=8, num_heads=2, **kw), 8),
    "mlstm_large_layer": (lambda **kw: MLSTMLargeLayer(features=16, num_heads=2, **kw), 16),
    "mlstm_block": (holding(MLSTMBlock, "mlstm", MLSTMLayer, features=8, num_heads=2, round_to=8), 8),
    "slstm_block": (holding(SLSTMBlock, "slstm", SLSTMLayer, {"ffn_round_to": 8}, features=8, num_heads=2), 8),
    "xlstm_large_block": (
        holding(XLSTMLargeBlock, "mlstm", MLSTMLargeLayer, {"ffn_round_to": 8}, features=16, num_heads=2), 16),
    "stack": (lambda **kw: XLSTMStack(features=8, n_blocks=2, slstm_at=(1,), num_heads=2, slstm_heads=2, **kw), 8),
}
CHUNKED = {"mlstm_layer", "mlstm_large_layer", "mlstm_block", "xlstm_large_block", "stack"}

# The 7B layout's input-gate bias of -10 keeps the memory at ~e^-9 of its inputs at init;
# the per-head layer norm then sees tiny outputs and is strongly curved in the incoming
# memory C, so central differences (eps 1e-6) carry a truncation error of 1e-6..1e-5.
# test_large_layout_gradients_converge_quadratically shows it is truncation (it falls as
# eps^2), not a wrong gradient.
FD_RTOL = {"mlstm_large_layer": 1e-4, "xlstm_large_block": 1e-4, "xlstm-7b": 1e-4}

# Every module (layers, blocks, the stack) and both LMs run the full contract checker in CI
# (about 4 minutes of one core together; the stack is the longest at ~1.5 min).


# xlstm-tiny's LM contract runs the stack (the same XLSTMStack, sLSTM at block 1) and so
# its mLSTM and sLSTM blocks; their stand-alone contracts (about 60-100 s each of the CI's 2
# cores) are kept for -m slow. The layers inside the blocks keep their own contracts here,
# but for the 7B layout's mLSTM layer, which runs inside xlstm_large_block's contract.
SLOW_CONTRACTS = {"stack", "mlstm_block", "slstm_block", "mlstm_large_layer"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CONTRACTS else n for n in sorted(MODULES)])
def test_layer_contract(name):
    make, features = MODULES[name]
    check_layer_contract(make, float_input(features), fd_rtol=FD_RTOL.get(name, 1e-6))


LM_OVERRIDES = {
    "xlstm-tiny": {},
    "xlstm-7b": dict(d_model=16, n_layers=1, vocab_size=64, num_heads=2, ffn_round_to=8, embed_init_std=0.16),
}


# Both LM contracts run with -m slow only (about 110 s of CI compile time each): their parts
# have their own contracts in CI -- xlstm-tiny's layers are the "stack" module above
# (XLSTMStack with an sLSTM block, the same layout), xlstm-7b's the xlstm_large_block and
# mlstm_large_layer ones -- and the LM wrapper (embedding, final norm, head) is the shared
# SequenceModel, whose contract tests/test_models.py checks on the Transformer LM.
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) for p in sorted(LM_OVERRIDES)])
def test_lm_contract(preset):
    check_layer_contract(
        model_factory(preset, **LM_OVERRIDES[preset]), tokens(64), input_name="inputs",
        fd_rtol=FD_RTOL.get(preset, 1e-6),
    )


# the modules whose contract runs in CI are checked there for all of this (and more): -m slow here
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n not in SLOW_CONTRACTS else n
                                  for n in sorted(MODULES)])
def test_streaming_resets_and_state(name):
    """For every module: two pieces with the state carried == one call, with a reset in
    each row (outputs and final state); a reset row equals a fresh call from the reset;
    initial_state on the unbound module has the returned state's structure, shapes and
    float32 dtypes; bad shapes raise ValueError naming the argument."""
    make, features = MODULES[name]
    if name in CHUNKED:
        make = functools.partial(make, chunk_size=4)
    rng = np.random.default_rng(7)
    batch, time, cut = 2, 9, 4
    x = jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)
    resets = np.zeros((batch, time), bool)
    resets[0, 2], resets[1, 6] = True, True
    layer = make()
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    apply = jax.jit(layer.apply)
    y, s = apply(variables, x, None, resets)
    y1, s1 = apply(variables, x[:, :cut], None, resets[:, :cut])
    y2, s2 = apply(variables, x[:, cut:], s1, resets[:, cut:])
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), y, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    y_row, s_row = apply(variables, x[1:, 6:])  # row 1 restarts at step 6
    np.testing.assert_allclose(y[1:, 6:], y_row, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_row)):
        np.testing.assert_allclose(a[1:], b, rtol=2e-5, atol=2e-5)

    s0 = make().initial_state(batch)
    assert jax.tree.structure(s0) == jax.tree.structure(s)
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s)):
        assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32 and not np.any(np.asarray(a))
    with pytest.raises(ValueError, match="x"):
        apply(variables, x[..., :-1])
    with pytest.raises(ValueError, match="resets"):
        apply(variables, x, None, resets[:, 1:])
    with pytest.raises(ValueError, match="state"):
        apply(variables, x, make().initial_state(batch + 1))


def test_large_layout_gradients_converge_quadratically():
    """float64 directional derivative of the 7B block (incoming state included) vs central
    differences: the error falls ~100x per 10x smaller step (truncation, so the gradient
    is right), reaching < 1e-7 relative."""
    with jax.enable_x64(True):
        layer = XLSTMLargeBlock(
            mlstm=MLSTMLargeLayer(features=16, num_heads=2, chunk_size=4, dtype=jnp.float64, param_dtype=jnp.float64),
            ffn_round_to=8,
        )
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.standard_normal((2, 7, 16)))
        v = jax.tree.map(lambda a: a.astype(jnp.float64), jax.jit(layer.init)(jax.random.key(1), x))
        _, state = jax.jit(layer.apply)(v, x)
        w = jnp.asarray(rng.standard_normal((2, 7, 16)))

        @jax.jit
        def loss(tree):
            y, s = layer.apply(tree[0], x, tree[1])
            return jnp.sum(y * w) + 0.1 * sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(s))

        tree = (v, state)
        direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), tree)
        analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(jax.grad(loss)(tree)), jax.tree.leaves(direction)))
        errs = []
        for eps in (1e-5, 1e-6, 1e-7):
            step = lambda sign: jax.tree.map(lambda a, d: a + sign * eps * d, tree, direction)  # noqa: B023,E731
            numeric = float(loss(step(1)) - loss(step(-1))) / (2 * eps)
            errs.append(abs(numeric - analytic) / abs(analytic))
        assert errs[0] / errs[1] > 30 and errs[1] / errs[2] > 30 and errs[2] < 1e-7, errs


def test_stack_places_slstm_blocks_and_matches_zoo_model():
    """slstm_at picks the block types; the zoo model is embed -> the same blocks -> norm -> head."""
    stack = XLSTMStack(features=8, n_blocks=4, slstm_at=(1, 3), num_heads=2, slstm_heads=2, parent=None)
    kinds = [type(stack.make_block(i, parent=None)).__name__ for i in range(4)]
    assert kinds == ["MLSTMBlock", "SLSTMBlock", "MLSTMBlock", "SLSTMBlock"]
    assert XLSTMStack(features=8, n_blocks=3, slstm_at="all", parent=None).slstm_indices() == (0, 1, 2)
    with pytest.raises(ValueError, match="slstm_at"):
        XLSTMStack(features=8, n_blocks=3, slstm_at=(3,), parent=None).slstm_indices()

    model = mnemax.create("xlstm-tiny", n_layers=2, slstm_at=(0,))
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
    v = jax.jit(model.init)(jax.random.key(0), tok)
    logits, state = jax.jit(model.apply)(v, tok)
    p = v["params"]
    stack = XLSTMStack(features=32, n_blocks=2, slstm_at=(0,), num_heads=2, slstm_heads=2, chunk_size=16)
    stack_params = {f"block_{i}": p[f"block_{i}"] for i in range(2)}
    stack_params["post_norm"] = p["final_norm"]
    x = nn.meta.unbox(p["embed"]["embedding"])[tok]
    feats, stack_state = jax.jit(stack.apply)({"params": stack_params}, x)
    want = feats @ nn.meta.unbox(p["head"]["kernel"])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state.blocks), jax.tree.leaves(stack_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_initialisation_follows_upstream():
    """Gate biases and the recurrent kernel start where the reference code starts them."""
    x = jnp.ones((1, 3, 64))
    p = nn.meta.unbox(jax.jit(MLSTMLayer(features=64, num_heads=4).init)(jax.random.key(0), x)["params"])
    np.testing.assert_allclose(p["fgate"]["bias"], np.linspace(3, 6, 4), rtol=1e-6)
    assert np.all(p["fgate"]["kernel"] == 0) and np.all(p["igate"]["kernel"] == 0)
    assert np.all(p["learnable_skip"] == 1) and p["proj_up"]["kernel"].shape == (64, 256)

    p = nn.meta.unbox(jax.jit(SLSTMLayer(features=64, num_heads=4, block_index=1, num_blocks=3).init)(jax.random.key(0), x)["params"])
    assert np.all(p["recurrent_kernel"] == 0)
    u = np.arange(16) / 15
    want_f = -(-5 + 12 * u ** (0.3 + 1.3 * 0.5))
    np.testing.assert_allclose(p["bias"][1], np.broadcast_to(want_f, (4, 16)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(powerlaw_forget_bias(16, 1, 3), want_f, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(p["bias"])[[0, 2, 3]] == 0)

    p = nn.meta.unbox(jax.jit(MLSTMLargeLayer(features=64, num_heads=4).init)(jax.random.key(0), x)["params"])
    np.testing.assert_allclose(p["igate_preact"]["bias"], -10.0)
    np.testing.assert_allclose(p["fgate_preact"]["bias"], np.linspace(3, 6, 4), rtol=1e-6)
    assert p["q"]["kernel"].shape == (64, 32) and p["v"]["kernel"].shape == (64, 64)


def np_mlstm_large_layer(p, x, cap, heads, eps=1e-6, norm_eps=1e-6):
    """The xLSTM 7B mLSTM layer in numpy (float64) from its equations, token by token:
    projections, capped gates cap * tanh(u / cap), the stabilised recurrent mLSTM (m_0 = 0),
    headwise layer norm, sigmoid output gate, out projection. Returns (y, (C, n, m))."""
    x = np.asarray(x, np.float64)
    w = {k: np.asarray(v, np.float64) for k, v in p.items()}
    capf = (lambda u: u) if cap is None else (lambda u: cap * np.tanh(u / cap))
    q, k, v, o = (x @ w[n] for n in ("q", "k", "v", "o"))
    ig, fg = capf(x @ w["wi"] + w["bi"]), capf(x @ w["wf"] + w["bf"])
    B, T, _ = x.shape
    dqk, dv = q.shape[-1] // heads, v.shape[-1] // heads
    C, n, m = np.zeros((B, heads, dqk, dv)), np.zeros((B, heads, dqk)), np.zeros((B, heads))
    h = np.zeros((B, T, heads, dv))
    for t in range(T):
        for b in range(B):
            for hd in range(heads):
                qt, kt = q[b, t, hd * dqk:(hd + 1) * dqk], k[b, t, hd * dqk:(hd + 1) * dqk]
                vt = v[b, t, hd * dv:(hd + 1) * dv]
                logf = -np.logaddexp(0.0, -fg[b, t, hd])
                m_new = max(logf + m[b, hd], ig[b, t, hd])
                fp, ip = np.exp(logf + m[b, hd] - m_new), np.exp(ig[b, t, hd] - m_new)
                C[b, hd] = fp * C[b, hd] + ip * np.outer(kt, vt)
                n[b, hd] = fp * n[b, hd] + ip * kt
                m[b, hd] = m_new
                qs = qt / np.sqrt(dqk)
                h[b, t, hd] = qs @ C[b, hd] / (max(abs(qs @ n[b, hd]), np.exp(-m_new)) + eps)
    mu = h.mean(-1, keepdims=True)
    hn = (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + norm_eps)
    hn = hn.reshape(B, T, heads * dv) * w["norm"]
    y = (1 / (1 + np.exp(-o)) * hn) @ w["out"]
    return y, (C, n, m)


def _large_layer_params(v):
    p = nn.meta.unbox(v)["params"]
    return {"q": p["q"]["kernel"], "k": p["k"]["kernel"], "v": p["v"]["kernel"], "o": p["ogate_preact"]["kernel"],
            "wi": p["igate_preact"]["kernel"], "bi": p["igate_preact"]["bias"], "wf": p["fgate_preact"]["kernel"],
            "bf": p["fgate_preact"]["bias"], "norm": p["multihead_norm"], "out": p["out_proj"]["kernel"]}


def test_soft_capped_gates_match_the_closed_form():
    """The 7B layer caps gate pre-activations at +-15: with gate weights large enough that the
    uncapped input gates reach ~100, the stabiliser m follows the capped closed form (it
    would exceed 15 without the cap, and a default cap of None gives other numbers)."""
    rng = np.random.default_rng(0)
    layer = MLSTMLargeLayer(features=16, num_heads=2)
    x = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    v = jax.jit(layer.init)(jax.random.key(0), x)
    p = nn.meta.unbox(v)["params"]
    big = {"igate_preact": 30.0, "fgate_preact": 3.0, "ogate_preact": 1.0}  # x W ~ N(0, 16 scale^2)
    p = {k: ({**sub, "kernel": jnp.asarray(rng.standard_normal(sub["kernel"].shape) * big[k], jnp.float32)}
             if k in big else sub) for k, sub in p.items()}
    p["multihead_norm"] = jnp.asarray(rng.standard_normal(p["multihead_norm"].shape) + 1, jnp.float32)
    v = {"params": p}
    y, s = jax.jit(layer.apply)(v, x)
    want_y, (C, n, m) = np_mlstm_large_layer(_large_layer_params(v), x, 15.0, 2)
    uncapped = np_mlstm_large_layer(_large_layer_params(v), x, None, 2)[1][2]
    assert float(uncapped.max()) > 50.0 and 14.0 < float(m.max()) <= 15.0
    np.testing.assert_allclose(np.asarray(s.m), m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.n), n, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.C), C, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-4)


def test_bf16_compute_is_close_to_float32():
    """bf16 compute keeps float32 states; its output is within twice the measured difference
    (4.2e-3 at most, with outputs up to 0.64) of the float32 layer's."""
    layer = MLSTMLargeLayer(features=16, num_heads=2)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 16)), jnp.float32)
    v = jax.jit(layer.init)(jax.random.key(0), x)
    y, _ = jax.jit(layer.apply)(v, x)
    y16, s16 = jax.jit(MLSTMLargeLayer(features=16, num_heads=2, dtype=jnp.bfloat16).apply)(v, x)
    assert y16.dtype == jnp.bfloat16 and s16.C.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y))) > 0.3
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y), rtol=0, atol=8e-3)


def test_layer_config_errors():
    x = jnp.ones((1, 3, 8))
    with pytest.raises(ValueError, match="num_heads"):
        SLSTMLayer(features=8, num_heads=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_heads"):
        MLSTMLayer(features=8, num_heads=3, round_to=8).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="qkv_blocksize"):
        MLSTMLayer(features=8, num_heads=2, round_to=8, qkv_blocksize=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="bias_init"):
        SLSTMLayer(features=8, num_heads=2, bias_init="nope").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_heads"):
        MLSTMLargeLayer(features=8, num_heads=3).init(jax.random.key(0), x)
