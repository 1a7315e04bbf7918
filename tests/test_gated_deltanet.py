"""Gated DeltaNet: a Qwen3-Next GDN layer's weights convert and reproduce its outputs, final
recurrent state, conv state and one-token decode (fixture written by
tests/fixtures/make_qwen3next_gdn_fixtures.py from HF ``transformers``' pure-PyTorch path); the
mixer equals a float64 numpy loop of the layer's equations (grouped value heads, resets, an
incoming state); inits; the mixer and the block pass the layer contract (the LM under
``-m slow``); presets have fla's layout; bad options raise naming the field."""

import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.convert import conv_state_from_qwen3next, gated_deltanet_from_qwen3next
from mnemax.layers import GatedDeltaNet, GatedDeltaNetBlock

from .contract import check_layer_contract
from .test_models import model_factory, tokens

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def load_fixture():
    f = np.load(FIXTURES / "qwen3next_gdn.npz")
    state_dict = {k[2:]: f[k] for k in f.files if k.startswith("w/")}
    return f, state_dict, json.loads(str(f["config_json"]))


def max_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


# --- the Qwen3-Next fixture -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_converted_qwen3next_layer_matches_its_outputs_and_states(backend):
    """Outputs and final recurrent state of ``x`` (T=19) and ``x_long`` (T=150, three of HF's
    chunks of 64), the conv state, and three one-token decode steps from the state, to <= 1e-4
    in float32 (measured <= 1.3e-6 with outputs up to 1.3)."""
    f, state_dict, hf_config = load_fixture()
    mixer, params = gated_deltanet_from_qwen3next(state_dict, hf_config, backend=backend, chunk_size=16)
    assert (mixer.num_heads, mixer.value_heads, mixer.head_dim, mixer.head_v_dim) == (2, 4, 8, 12)
    apply = jax.jit(mixer.apply)
    y, state = apply(params, jnp.asarray(f["x"]))
    assert max_err(y, f["y"]) <= 1e-4 and max_err(state.S, f["state"]) <= 1e-4
    # HF keeps the last conv_kernel pre-conv inputs (channels [q | k | v]); mnemax the last W - 1
    want_conv = conv_state_from_qwen3next(f["conv_state"], mixer)
    for name in ("conv_q", "conv_k", "conv_v"):
        assert max_err(getattr(state, name), getattr(want_conv, name)) <= 1e-4, name
    assert np.abs(f["conv_state"][..., 1:]).min() > 0  # the compared columns are real inputs, not padding
    # decode one token at a time from the state
    outs = []
    for t in range(f["x_decode"].shape[1]):
        out, state = apply(params, jnp.asarray(f["x_decode"][:, t : t + 1]), state)
        outs.append(out)
    assert max_err(jnp.concatenate(outs, axis=1), f["y_decode"]) <= 1e-4
    assert max_err(state.S, f["state_decode"]) <= 1e-4
    want_conv = conv_state_from_qwen3next(f["conv_state_decode"], mixer)
    assert max_err(state.conv_v, want_conv.conv_v) <= 1e-4
    y_long, state_long = apply(params, jnp.asarray(f["x_long"]))
    assert max_err(y_long, f["y_long"]) <= 1e-4 and max_err(state_long.S, f["state_long"]) <= 1e-4
    assert float(np.abs(f["state_long"]).max()) > 0.1  # a state that carries information


def test_converter_rejects_bad_state_dicts():
    f, state_dict, hf_config = load_fixture()
    with pytest.raises(ValueError, match="missing"):
        gated_deltanet_from_qwen3next({k: v for k, v in state_dict.items() if k != "A_log"}, hf_config)
    with pytest.raises(ValueError, match="does not map"):
        gated_deltanet_from_qwen3next({**state_dict, "conv1d.bias": np.zeros(80)}, hf_config)
    with pytest.raises(ValueError, match=r"in_proj_ba\.weight.*shape"):
        gated_deltanet_from_qwen3next({**state_dict, "in_proj_ba.weight": np.zeros((6, 32))}, hf_config)
    with pytest.raises(ValueError, match="hidden_act"):
        gated_deltanet_from_qwen3next(state_dict, {**hf_config, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="linear_num_value_heads"):
        gated_deltanet_from_qwen3next(state_dict, {**hf_config, "linear_num_value_heads": 3})
    # one layer out of a model's state_dict, by prefix
    prefixed = {f"model.layers.0.linear_attn.{k}": v for k, v in state_dict.items()}
    prefixed["model.embed_tokens.weight"] = np.zeros((64, 32), np.float32)
    _, params = gated_deltanet_from_qwen3next(prefixed, hf_config, prefix="model.layers.0.linear_attn.")
    _, want = gated_deltanet_from_qwen3next(state_dict, hf_config)
    jax.tree.map(np.testing.assert_array_equal, params, want)


# --- the equations, in float64 numpy --------------------------------------------------------------


def silu(v):
    return v / (1 + np.exp(-v))


def softplus(v):
    return np.logaddexp(0.0, v)


def reference_gdn(p, x, conv_tails, S, resets, *, dk, dv, conv_size, use_gate, allow_neg_eigval, eps):
    """The GDN layer token by token in float64: per row, the conv inputs of the last
    conv_size - 1 steps and the matrix memory, both cleared at a reset."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    batch, time, _ = x.shape
    Hk, Hv = p["q_proj"]["kernel"].shape[1], p["v_proj"]["kernel"].shape[1]
    r = Hv // Hk
    hist = {n: np.array(conv_tails[n], np.float64) for n in ("q", "k", "v")}  # (batch, W - 1, channels)
    S = np.array(S, np.float64)
    y = np.zeros((batch, time, x.shape[-1]))
    for b in range(batch):
        for t in range(time):
            if resets[b, t]:
                S[b] = 0.0
                for n in hist:
                    hist[n][b] = 0.0
            u = x[b, t]
            conv_out = {}
            for n in ("q", "k", "v"):
                pre = np.einsum("d,d...->...", u, p[f"{n}_proj"]["kernel"]).reshape(-1)
                window = np.concatenate([hist[n][b], pre[None]], axis=0)  # (W, channels), oldest first
                conv_out[n] = silu(np.sum(window * p[f"{n}_conv1d"]["kernel"], axis=0))
                hist[n][b] = window[1:] if conv_size > 1 else hist[n][b]
            q = conv_out["q"].reshape(Hk, dk)
            k = conv_out["k"].reshape(Hk, dk)
            v = conv_out["v"].reshape(Hv, dv)
            q = q / np.sqrt(np.sum(q**2, -1, keepdims=True) + 1e-6)
            k = k / np.sqrt(np.sum(k**2, -1, keepdims=True) + 1e-6)
            beta = 1 / (1 + np.exp(-(u @ p["b_proj"]["kernel"])))
            beta = 2 * beta if allow_neg_eigval else beta
            g = -np.exp(p["A_log"]) * softplus(u @ p["a_proj"]["kernel"] + p["dt_bias"])
            o = np.zeros((Hv, dv))
            for j in range(Hv):
                kj, qj = k[j // r], q[j // r]
                Sj = np.exp(g[j]) * S[b, j]
                Sj = (np.eye(dk) - beta[j] * np.outer(kj, kj)) @ Sj + beta[j] * np.outer(kj, v[j])
                S[b, j] = Sj
                o[j] = Sj.T @ qj / math.sqrt(dk)
            o = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + eps) * p["o_norm"]["scale"]
            if use_gate:
                o = o * silu(np.einsum("d,dhe->he", u, p["g_proj"]["kernel"]))
            y[b, t] = np.einsum("he,hed->d", o, p["o_proj"]["kernel"])
    return y, S, hist


@pytest.mark.parametrize("backend,allow_neg_eigval,use_gate", [
    ("reference", False, True), ("xla", True, True), ("xla", False, False)])
def test_mixer_equals_a_numpy_loop_of_the_equations(backend, allow_neg_eigval, use_gate):
    """float64, num_v_heads = 2 num_heads, expand_v 1.5, an incoming state and resets at
    different steps per row (one at step 0); chunk 4 over 11 steps."""
    rng = np.random.default_rng(0)
    batch, time, d, Hk, dk, W = 3, 11, 12, 2, 4, 3
    with jax.enable_x64(True):
        mixer = GatedDeltaNet(
            features=d, num_heads=Hk, num_v_heads=2 * Hk, head_dim=dk, expand_v=1.5, conv_size=W, use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval, norm_eps=1e-5, backend=backend, chunk_size=4,
            dtype=jnp.float64, param_dtype=jnp.float64,
        )
        dv, Hv = mixer.head_v_dim, mixer.value_heads
        x = rng.standard_normal((batch, time, d))
        params = nn.meta.unbox(mixer.init(jax.random.key(0), jnp.asarray(x)))["params"]
        # larger weights than the init, so that every term matters
        params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), params)
        params["A_log"] = np.log(rng.uniform(0.2, 2.0, Hv))
        state = mixer.initial_state(batch)._replace(
            conv_q=rng.standard_normal((batch, W - 1, Hk * dk)), conv_k=rng.standard_normal((batch, W - 1, Hk * dk)),
            conv_v=rng.standard_normal((batch, W - 1, Hv * dv)), S=0.5 * rng.standard_normal((batch, Hv, dk, dv)),
        )
        resets = np.zeros((batch, time), bool)
        resets[0, 5] = resets[1, 0] = resets[1, 8] = True
        y, new = jax.jit(mixer.apply)({"params": params}, jnp.asarray(x), state, jnp.asarray(resets))
        tails = {"q": state.conv_q, "k": state.conv_k, "v": state.conv_v}
        want_y, want_S, want_hist = reference_gdn(
            params, x, tails, state.S, resets, dk=dk, dv=dv, conv_size=W, use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval, eps=1e-5)
    assert y.dtype == jnp.float64 and new.S.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(new.S), want_S, rtol=1e-9, atol=1e-10)
    for n in ("q", "k", "v"):
        np.testing.assert_allclose(np.asarray(getattr(new, f"conv_{n}")), want_hist[n], rtol=1e-12, atol=1e-12)
    assert float(np.abs(want_S).max()) > 0.1


def test_inits_follow_fla():
    d, Hv = 64, 8
    mixer = GatedDeltaNet(features=d, num_heads=4, num_v_heads=Hv, head_dim=16)
    p = nn.meta.unbox(mixer.init(jax.random.key(0), jnp.zeros((1, 4, d))))["params"]
    A = np.exp(np.asarray(p["A_log"], np.float64))
    assert A.shape == (Hv,) and A.min() >= 0.01 * (1 - 1e-6) and A.max() <= 16 * (1 + 1e-6) and A.std() > 2
    dt = np.log1p(np.exp(np.asarray(p["dt_bias"], np.float64)))  # softplus(dt_bias) = the sampled dt
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    np.testing.assert_array_equal(np.asarray(p["o_norm"]["scale"]), np.ones(32))
    for name, shape in [("q_proj", (d, 4, 16)), ("k_proj", (d, 4, 16)), ("v_proj", (d, Hv, 32)), ("g_proj", (d, Hv, 32)),
                        ("a_proj", (d, Hv)), ("b_proj", (d, Hv)), ("o_proj", (Hv, 32, d))]:
        w = np.asarray(p[name]["kernel"])
        assert w.shape == shape and abs(w.std() - 0.02) < 0.004, (name, w.shape, w.std())
    assert np.asarray(p["v_conv1d"]["kernel"]).shape == (4, Hv * 32) and "bias" not in p["v_conv1d"]


# --- the contract -------------------------------------------------------------------------------------


def _floats(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make


def tiny_mixer(**kw):
    return GatedDeltaNet(features=8, num_heads=2, num_v_heads=4, head_dim=4, expand_v=1.0, conv_size=3, chunk_size=4, **kw)


def test_gated_deltanet_mixer_contract():
    check_layer_contract(tiny_mixer, _floats(8))


def test_block_is_prenorm_mixer_then_swiglu_mlp():
    """x + Mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(.)) (fla's block), state = the mixer's;
    fla's MLP width by default; no MLP sub-block at width 0."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 8)), jnp.float32)
    block = GatedDeltaNetBlock(mixer=tiny_mixer(parent=None), intermediate_size=16)
    variables = block.init(jax.random.key(0), x)
    p = nn.meta.unbox(variables)["params"]
    y, state = jax.jit(block.apply)(variables, x)

    def rms(u, scale):
        return u / jnp.sqrt(jnp.mean(u**2, -1, keepdims=True) + 1e-6) * scale

    m, m_state = tiny_mixer().apply({"params": p["mixer"]}, rms(x, p["attn_norm"]["scale"]))
    h = x + m
    u = rms(h, p["mlp_norm"]["scale"])
    mlp = p["mlp"]
    want = h + (jax.nn.silu(u @ mlp["gate"]["kernel"]) * (u @ mlp["up"]["kernel"])) @ mlp["down"]["kernel"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), state, m_state)
    y1, s1 = block.apply(variables, x[:, :4])
    y2, s2 = block.apply(variables, x[:, 4:], s1)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert GatedDeltaNetBlock(mixer=GatedDeltaNet(features=768, parent=None)).mlp_width == 2048
    assert GatedDeltaNetBlock(mixer=GatedDeltaNet(features=2048, parent=None)).mlp_width == 5632
    bare = GatedDeltaNetBlock(mixer=tiny_mixer(parent=None), hidden_ratio=0.0)
    assert set(nn.meta.unbox(bare.init(jax.random.key(0), x))["params"]) == {"attn_norm", "mixer"}


@pytest.mark.slow
def test_gated_deltanet_block_contract():
    check_layer_contract(
        lambda dtype=None, param_dtype=jnp.float32, **kw: GatedDeltaNetBlock(
            mixer=tiny_mixer(dtype=dtype, param_dtype=param_dtype, parent=None), intermediate_size=16, **kw),
        _floats(8),
    )


@pytest.mark.slow
def test_gated_deltanet_lm_contract():
    check_layer_contract(model_factory("gdn-tiny", d_model=16, n_layers=1, chunk_size=4), tokens(64), input_name="inputs")


# --- presets and options ---------------------------------------------------------------------------


def gdn_lm_count(d, n_layers, vocab, heads, head_dim, expand_v, mlp, tied, W=4):
    """fla's GatedDeltaNetForCausalLM: per layer q/k (d x H d_k each), v/g (d x H d_v each),
    a/b (d x H each), A_log and dt_bias (H), three convs (W per channel), o_norm (d_v), o_proj
    (H d_v x d), two RMSNorms (d) and a SwiGLU MLP (3 d mlp); embedding, final norm, head."""
    dk, dv = head_dim, int(head_dim * expand_v)
    mixer = 2 * d * heads * dk + 2 * d * heads * dv + 2 * d * heads + 2 * heads + W * (2 * heads * dk + heads * dv)
    mixer += dv + heads * dv * d
    per_layer = mixer + 2 * d + 3 * d * mlp
    return vocab * d * (1 if tied else 2) + n_layers * per_layer + d


def test_presets_have_fla_layouts():
    sizes = {}
    for name in ("gdn-125m", "gdn-1.3b"):
        shapes = jax.eval_shape(mnemax.create(name).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        sizes[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    # fla's GatedMLP width: 256 ceil(int(2/3 * 4 d) / 256): 2048 for d 768, 5632 for d 2048
    assert sizes["gdn-125m"] == gdn_lm_count(768, 12, 50280, 6, 128, 2, 2048, tied=True) == 152_141_712
    assert sizes["gdn-1.3b"] == gdn_lm_count(2048, 21, 32000, 6, 256, 2, 5632, tied=False) == 1_387_348_732
    state = jax.eval_shape(lambda: mnemax.create("gdn-125m").initial_state(2))
    assert state.blocks[0].S.shape == (2, 6, 128, 256) and state.blocks[0].conv_v.shape == (2, 3, 1536)


@pytest.mark.parametrize("option,value,message", [
    ("num_v_heads", 3, r"num_v_heads must be a multiple of num_heads \(2\), got 3"),
    ("expand_v", 0.3, r"expand_v must be .*head_dim \* expand_v a positive integer"),
    ("A_init_range", (0.0, 16.0), r"A_init_range must be \(low, high\) with 0 < low <= high"),
    ("dt_max", 1e-4, r"dt_max must be >= dt_min"),
    ("intermediate_size", -1, r"intermediate_size must be an integer >= 0"),
    ("mlp_kind", "relu", r"mlp_kind must be one of"),
])
def test_a_bad_option_is_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        mnemax.create("gdn-tiny", **{option: value})


@pytest.mark.parametrize("option,value,message", [
    ("num_v_heads", 3, r"num_v_heads must be a multiple of num_heads \(2\), got 3"),
    ("expand_v", 0.3, r"expand_v must make head_dim \* expand_v a positive integer"),
    ("head_dim", 0, r"head_dim must be a positive integer"),
    ("A_init_range", (2.0, 1.0), r"A_init_range must be \(low, high\)"),
    ("dt_min", 0.5, r"dt_min and dt_max must satisfy"),
])
def test_the_mixer_names_a_bad_field(option, value, message):
    mixer = GatedDeltaNet(**{"features": 8, "num_heads": 2, "head_dim": 4, option: value})
    with pytest.raises(ValueError, match=message):
        mixer.initial_state(1)
    with pytest.raises(ValueError, match=message):
        mixer.init(jax.random.key(0), jnp.zeros((1, 3, 8)))


@pytest.mark.slow
def test_grouped_value_heads_on_the_gpu_kernels_equal_the_reference(monkeypatch):
    """num_v_heads = 2 num_heads (Qwen3-Next's layout): the layer passes its H_k q/k heads to the
    op once, and the ``pallas_gpu`` kernels (interpret mode) read each group in place; outputs,
    state and the gradients of every parameter equal the ``reference`` backend's to 1e-4 / 1e-3
    of the largest entry (float32, three chunks, a reset)."""
    monkeypatch.setenv("MNEMAX_PALLAS_INTERPRET", "1")
    x = _floats(8)(np.random.default_rng(3), 2, 11)
    resets = jnp.zeros((2, 11), bool).at[1, 5].set(True)
    params = tiny_mixer().init(jax.random.key(1), x)

    def run(backend):
        mixer = tiny_mixer(backend=backend)

        def loss(p):
            y, state = mixer.apply(p, x, None, resets)
            return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size) + jnp.sum(state.S), (y, state.S)

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, (y_ref, S_ref)), g_ref = run("reference")
    (_, (y, S)), g = run("pallas_gpu")
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1.0))  # noqa: E731
    assert rel(y, y_ref) < 1e-4 and rel(S, S_ref) < 1e-4, (rel(y, y_ref), rel(S, S_ref))
    errs = jax.tree.map(rel, g, g_ref)
    assert max(jax.tree.leaves(errs)) < 1e-3, errs
