"""The zoo scaffold: registry, configs, heads, and the Transformer LM on the contract."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax import ModelConfig

from .contract import check_layer_contract


def model_factory(name, **overrides):
    def make(dtype=None, param_dtype=None, **kw):
        changes = dict(overrides)
        if dtype is not None:
            changes["dtype"] = jnp.dtype(dtype).name
        if param_dtype is not None:
            changes["param_dtype"] = jnp.dtype(param_dtype).name
        cfg = mnemax.get_config(name, **changes)
        return mnemax.SequenceModel(cfg, **kw)

    return make


def tokens(vocab):
    def make(rng, batch, time):
        return jnp.asarray(rng.integers(0, vocab, (batch, time)), jnp.int32)

    return make


def test_transformer_lm_contract():
    check_layer_contract(model_factory("transformer-tiny", window=16), tokens(64), input_name="inputs")


@pytest.mark.slow  # 23 s; the mean pool's streaming and resets are held by test_elm's neuron model
# test (a mean-pooled classifier on continuous inputs) and its numbers by test_heads_match_manual_computation
def test_classifier_with_mean_pool_contract():
    check_layer_contract(
        model_factory("transformer-tiny", head="classify", num_classes=5, pool="mean", vocab_size=None, input_dim=3, n_layers=1),
        lambda rng, b, t: jnp.asarray(rng.standard_normal((b, t, 3)), jnp.float32),
        input_name="inputs",
    )


def test_registry_lists_and_creates():
    names = mnemax.list_models()
    assert {"transformer-tiny", "transformer-125m"} <= set(names)
    m = mnemax.create("transformer-tiny", d_model=16, num_heads=4)
    assert m.config.d_model == 16 and m.config.block["num_heads"] == 4
    assert m.config.preset == "transformer-tiny"
    with pytest.raises(ValueError, match="unknown model"):
        mnemax.create("no-such-model")
    with pytest.raises(ValueError, match="num_hedas"):
        mnemax.create("transformer-tiny", num_hedas=3)
    with pytest.raises(ValueError, match="head"):
        mnemax.create("transformer-tiny", head="nonsense")


def test_param_count_of_125m_matches_formula():
    cfg = mnemax.get_config("transformer-125m")
    model = mnemax.build(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
    d, v, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    hidden = int(round(cfg.block["mlp_ratio"] * d))
    per_layer = 4 * d * d + 3 * d * hidden + 2 * d
    assert count == v * d + L * per_layer + d
    assert 120e6 < count < 130e6


def test_config_json_roundtrip_and_errors():
    cfg = mnemax.get_config("transformer-tiny", n_layers=3)
    again = ModelConfig.from_dict(__import__("json").loads(cfg.to_json()))
    assert again == cfg and hash(again) == hash(cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(family="transformer", d_model=8, n_layers=1)
    with pytest.raises(ValueError, match="num_classes"):
        ModelConfig(family="transformer", d_model=8, n_layers=1, vocab_size=4, head="classify")
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_heads_match_manual_computation():
    """LM logits == final-norm features @ head kernel; tied LM uses the embedding; mean
    pooling == numpy running mean of the features."""
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)

    for tie in (False, True):
        model = mnemax.create("transformer-tiny", tie_embeddings=tie)
        v = jax.jit(model.init)(jax.random.key(0), tok)
        (logits, _), inter = jax.jit(lambda v: model.apply(
            v, tok, capture_intermediates=lambda m, _: m.name == "final_norm", mutable=["intermediates"]))(v)
        feats = np.asarray(inter["intermediates"]["final_norm"]["__call__"][0][0], np.float64)
        p = nn.meta.unbox(v["params"])
        w = np.asarray(p["embed"]["embedding"]).T if tie else np.asarray(p["head"]["kernel"])
        np.testing.assert_allclose(np.asarray(logits), feats @ w, rtol=1e-4, atol=1e-5)

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 3)), jnp.float32)
    resets = jnp.zeros((2, 7), bool).at[1, 3].set(True)
    cfg = dict(head="classify", num_classes=4, vocab_size=None, input_dim=3)
    mean_model = mnemax.create("transformer-tiny", pool="mean", **cfg)
    v = jax.jit(mean_model.init)(jax.random.key(0), x)
    (out, _), inter = jax.jit(lambda v: mean_model.apply(
        v, x, None, resets, capture_intermediates=lambda m, _: m.name == "final_norm", mutable=["intermediates"]))(v)
    feats = np.asarray(inter["intermediates"]["final_norm"]["__call__"][0][0], np.float64)
    means = np.zeros_like(feats)
    for b in range(2):
        start = 0
        for t in range(7):
            if resets[b, t]:
                start = t
            means[b, t] = feats[b, start : t + 1].mean(0)
    p = nn.meta.unbox(v["params"])
    np.testing.assert_allclose(np.asarray(out), means @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"]), rtol=1e-4, atol=1e-5)


def _remat_policies(jaxpr) -> list:
    """The policy of every rematerialised region (``jax.checkpoint``) in ``jaxpr``, nested ones too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith(("checkpoint", "remat")):
            found.append(eqn.params.get("policy"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if hasattr(inner, "eqns"):
                    found += _remat_policies(inner)
    return found


@pytest.mark.parametrize("preset,overrides", [
    ("transformer-tiny", {}),
    ("transformer-tiny", {"remat_policy": "dots"}),
    ("transformer-tiny", {"remat_policy": "dots_all", "scan_layers": True}),
])
def test_remat_model_matches_plain(preset, overrides):
    """Rematerialised blocks, under every policy (what the forward keeps for the backward),
    give the loss and gradients of the plain model."""
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    plain = mnemax.create(preset, **{k: v for k, v in overrides.items() if k == "scan_layers"})
    remat = mnemax.create(preset, remat=True, **overrides)
    v = jax.jit(plain.init)(jax.random.key(0), tok)
    loss = lambda m: lambda v: jnp.sum(m.apply(v, tok)[0] ** 2)  # noqa: E731
    policy = {"nothing": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
              "dots_all": jax.checkpoint_policies.dots_saveable}[overrides.get("remat_policy", "nothing")]
    kept = _remat_policies(jax.make_jaxpr(loss(remat))(v).jaxpr)
    assert kept and all(p is policy for p in kept), (kept, policy)
    assert not _remat_policies(jax.make_jaxpr(loss(plain))(v).jaxpr)
    np.testing.assert_allclose(loss(remat)(v), loss(plain)(v), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(loss(remat))(v)), jax.tree.leaves(jax.grad(loss(plain))(v))):
        # float32 sums in another order: errors relative to the gradient's largest entry
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(b).max())))


def test_bad_model_inputs():
    model = mnemax.create("transformer-tiny")
    v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="inputs"):
        model.apply(v, jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="state"):
        model.apply(v, jnp.zeros((1, 4), jnp.int32), model.initial_state(2))
    with pytest.raises(ValueError, match="remat_policy must be one of .*got 'dot'"):
        mnemax.create("transformer-tiny", remat=True, remat_policy="dot")


def test_logit_soft_cap_and_final_norm_variants():
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 5)), jnp.int32)
    plain = mnemax.create("transformer-tiny")
    capped = mnemax.create("transformer-tiny", logit_soft_cap=0.5)
    v = jax.jit(plain.init)(jax.random.key(0), tok)
    raw, _ = plain.apply(v, tok)
    out, _ = capped.apply(v, tok)
    np.testing.assert_allclose(np.asarray(out), 0.5 * np.tanh(np.asarray(raw, np.float64) / 0.5), rtol=1e-5, atol=1e-6)
    for kind, n_params in (("none", 0), ("layer_nobias", 1), ("layer", 2), ("rms", 1)):
        m = mnemax.create("transformer-tiny", final_norm=kind)
        v = jax.jit(m.init)(jax.random.key(0), tok)
        assert len(v["params"].get("final_norm", {})) == n_params, kind


@pytest.mark.parametrize("preset,layers,extra,period", [
    ("transformer-tiny", 3, {}, 1),
    ("mamba-tiny", 3, {}, 1),
    # an sLSTM block every 2nd layer: groups of (mLSTM, sLSTM) blocks, scanned twice
    ("xlstm-tiny", 4, {"slstm_at": (1, 3)}, 2),
])
def test_scan_layers_equals_the_unrolled_stack(preset, layers, extra, period):
    """scan_layers stacks the same parameters on a "layers" axis (per block of a repeating
    group) and computes the same outputs and states, also streamed from a state and with
    resets."""
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
    resets = jnp.zeros((2, 10), bool).at[1, 4].set(True)
    plain = mnemax.create(preset, n_layers=layers, **extra)
    scanned = mnemax.create(preset, n_layers=layers, scan_layers=True, **extra)
    v = jax.jit(plain.init)(jax.random.key(0), tok)
    p = nn.meta.unbox(v["params"])
    blocks = [p.pop(f"block_{i}") for i in range(layers)]
    stack = lambda j: jax.tree.map(lambda *l: np.stack([np.asarray(a) for a in l]), *blocks[j::period])  # noqa: E731
    p["blocks"] = {"block": stack(0)} if period == 1 else {f"block_{j}": stack(j) for j in range(period)}
    sv = {"params": p}
    # the scanned model's own init has the same structure
    own = jax.eval_shape(scanned.init, jax.random.key(0), tok)
    assert jax.tree.structure(nn.meta.unbox(own)) == jax.tree.structure(sv)
    if preset == "xlstm-tiny":  # the sLSTM forget-gate bias init depends on the layer's depth
        got = nn.meta.unbox(jax.jit(scanned.init)(jax.random.key(0), tok)["params"])["blocks"]["block_1"]["slstm"]["bias"]
        # (1.6e-6 apart at -O0: the bias's float32 power law computed in two programs)
        np.testing.assert_allclose(np.asarray(got), np.asarray(p["blocks"]["block_1"]["slstm"]["bias"]), rtol=1e-5)
        assert not np.allclose(got[0], got[1])
    plain_apply, scanned_apply = jax.jit(plain.apply), jax.jit(scanned.apply)
    y0, s0 = plain_apply(v, tok[:, :6], None, resets[:, :6])
    y1, s1 = plain_apply(v, tok[:, 6:], s0, resets[:, 6:])
    z0, t0 = scanned_apply(sv, tok[:, :6], None, resets[:, :6])
    z1, t1 = scanned_apply(sv, tok[:, 6:], t0, resets[:, 6:])
    np.testing.assert_allclose(np.asarray(z0), np.asarray(y0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(z1), np.asarray(y1), rtol=1e-5, atol=1e-5)
    for i in range(layers):
        layer = t1.blocks if period == 1 else t1.blocks[i % period]
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda l: l[i // period], layer)), jax.tree.leaves(s1.blocks[i])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    init_state = scanned.initial_state(2)
    assert jax.tree.structure(init_state) == jax.tree.structure(t0)


def test_scan_layers_rejects_a_stack_without_a_repeating_group():
    model = mnemax.create("xlstm-tiny", n_layers=3, slstm_at=(1,), scan_layers=True)
    with pytest.raises(ValueError, match="period dividing n_layers=3"):
        jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
