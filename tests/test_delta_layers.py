"""DeltaNet and Kimi Delta Attention: fla 0.6.0's layers' weights, mapped from fla's names,
reproduce their outputs, recurrent states and conv states over three cache-carrying calls
(fixture written by tests/fixtures/make_fla_delta_layers.py); the ``xla`` backend equals
``reference`` through the layers (outputs, states, gradients; resets and an incoming
state); inits; the mixers and blocks pass the layer contract (the blocks and LMs under
``-m slow``); bad options raise naming the field; the presets have fla's layouts."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.layers import DeltaNet, DeltaNetBlock, KimiDeltaAttention, KimiDeltaAttentionBlock

from .contract import check_layer_contract
from .test_models import model_factory, tokens

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "fla_delta_layers.npz"

# fla 0.6.0's layer defaults (the fixture's configs give only what differs)
FLA_DELTANET = dict(num_heads=4, expand_k=1.0, expand_v=1.0, use_beta=True, use_gate=False, use_short_conv=True,
                    conv_size=4, conv_bias=False, allow_neg_eigval=False, qk_activation="silu", qk_norm="l2",
                    norm_eps=1e-5)
FLA_KDA = dict(num_heads=16, num_v_heads=None, head_dim=128, expand_v=1.0, use_short_conv=True, conv_size=4,
               conv_bias=False, allow_neg_eigval=False, norm_eps=1e-5)


def max_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


# --- fla -> mnemax -------------------------------------------------------------------------------


def mixer_from_fla(layer: str, config: dict, **kw):
    """The mnemax mixer of an fla ``DeltaNet`` / ``KimiDeltaAttention`` built with ``config``."""
    config = dict(config)
    features = config.pop("hidden_size")
    if layer == "DeltaNet":
        return DeltaNet(features=features, **{**FLA_DELTANET, **config}, **kw)
    return KimiDeltaAttention(features=features, **{**FLA_KDA, **config}, **kw)


def params_from_fla(weights: dict, mixer) -> dict:
    """fla's parameters (names and torch layouts) -> the mixer's ``params``; every fla
    parameter is used once. nn.Linear (out, in) -> kernel (in, *out) with the output split
    head-major; convs (C, 1, W) -> (W, C); KDA's dt_bias (H_v d_k,) -> (H_v, d_k)."""
    w = dict(weights)
    kda = isinstance(mixer, KimiDeltaAttention)
    if kda:
        Hk, Hv, dk, dv = mixer.num_heads, mixer.value_heads, mixer.head_dim, mixer.head_v_dim
    else:
        Hk = Hv = mixer.num_heads
        dk, dv = mixer.head_k_dim, mixer.head_v_dim
    p = {}

    def linear(name, fla_name, *out):
        weight = w.pop(fla_name)
        p[name] = {"kernel": weight.T.reshape(weight.shape[1], *out)}

    linear("q_proj", "q_proj.weight", Hk, dk)
    linear("k_proj", "k_proj.weight", Hk, dk)
    linear("v_proj", "v_proj.weight", Hv, dv)
    if mixer.use_short_conv:
        for n in "qkv":
            p[f"{n}_conv1d"] = {"kernel": w.pop(f"{n}_conv1d.weight")[:, 0, :].T}
            if mixer.conv_bias:
                p[f"{n}_conv1d"]["bias"] = w.pop(f"{n}_conv1d.bias")
    if kda or mixer.use_beta:
        linear("b_proj", "b_proj.weight", Hv)
    if kda:
        linear("f_a_proj", "f_proj.0.weight", dv)
        linear("f_b_proj", "f_proj.1.weight", Hv, dk)
        linear("g_a_proj", "g_proj.0.weight", dv)
        linear("g_b_proj", "g_proj.1.weight", Hv, dv)
        p["g_b_proj"]["bias"] = w.pop("g_proj.1.bias").reshape(Hv, dv)
        p["A_log"] = w.pop("A_log")
        p["dt_bias"] = w.pop("dt_bias").reshape(Hv, dk)
    elif mixer.use_gate:
        linear("g_proj", "g_proj.weight", Hv, dv)
    p["o_norm"] = {"scale": w.pop("o_norm.weight")}
    o_proj = w.pop("o_proj.weight")  # (d_model, H_v d_v)
    p["o_proj"] = {"kernel": o_proj.T.reshape(Hv, dv, o_proj.shape[0])}
    assert not w, f"fla parameters left unmapped: {sorted(w)}"
    return p


def load_case(case):
    f = np.load(FIXTURE)
    prefix = f"{case}/"
    weights = {k[len(prefix) + 2:]: f[k] for k in f.files if k.startswith(prefix + "w/")}
    arrays = {k[len(prefix):]: f[k] for k in f.files if k.startswith(prefix) and "/w/" not in k}
    return str(f[prefix + "layer"]), json.loads(str(f[prefix + "config"])), weights, arrays


CASES = ["deltanet_a", "deltanet_b", "deltanet_c", "kda_a", "kda_b", "kda_c"]


def test_fixture_holds_the_cases_and_versions():
    f = np.load(FIXTURE)
    assert json.loads(str(f["cases"])) == CASES
    versions = json.loads(str(f["versions"]))
    assert versions["fla-core"] == "0.6.0" and versions["flash-linear-attention"] == "0.6.0"


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("case", CASES)
def test_fla_layer_outputs_and_states_are_reproduced(case, backend):
    """Three calls carrying the state (T = 19 fresh, 6, then 1): outputs, the recurrent
    state and the conv tails after the first and last call, to <= 1e-4 in float32
    (measured <= 1e-6 with outputs up to 2.1)."""
    layer, config, weights, a = load_case(case)
    mixer = mixer_from_fla(layer, config, backend=backend, chunk_size=8)
    params = params_from_fla(weights, mixer)
    want_shapes = jax.eval_shape(mixer.init, jax.random.key(0), jnp.zeros((1, 3, config["hidden_size"])))["params"]
    assert jax.tree.map(lambda s: s.shape, nn.meta.unbox(want_shapes)) == jax.tree.map(np.shape, params)
    apply = jax.jit(mixer.apply)
    state = None
    for n in (1, 2, 3):
        y, state = apply({"params": params}, jnp.asarray(a[f"x{n}"]), state)
        assert max_err(y, a[f"y{n}"]) <= 1e-4, (n, max_err(y, a[f"y{n}"]))
        if f"S{n}" in a:
            assert max_err(state.S, a[f"S{n}"]) <= 1e-4, (n, max_err(state.S, a[f"S{n}"]))
            for name in ("conv_q", "conv_k", "conv_v"):
                if mixer.use_short_conv:
                    assert max_err(getattr(state, name), a[f"{name}{n}"]) <= 1e-4, (n, name)
                else:
                    assert getattr(state, name).shape[1] == 0 and f"{name}{n}" not in a
    assert float(np.abs(a["S3"]).max()) > 0.1 and float(np.abs(a["y3"]).max()) > 0.1


def test_the_mapping_uses_every_fla_parameter_once():
    layer, config, weights, _ = load_case("kda_a")
    mixer = mixer_from_fla(layer, config)
    with pytest.raises(AssertionError, match="left unmapped"):
        params_from_fla({**weights, "extra.weight": np.zeros(3)}, mixer)
    with pytest.raises(KeyError):
        params_from_fla({k: v for k, v in weights.items() if k != "A_log"}, mixer)


# --- backends ------------------------------------------------------------------------------------------


def perturbed(mixer, x, rng, scale=0.3):
    params = nn.meta.unbox(mixer.init(jax.random.key(0), x))["params"]
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape), params)


MIXERS = {
    "deltanet": lambda **kw: DeltaNet(features=12, num_heads=2, expand_v=1.5, conv_size=3, **kw),
    "deltanet_gated_sum": lambda **kw: DeltaNet(features=12, num_heads=2, use_gate=True, qk_norm="sum", qk_activation="relu",
                                                allow_neg_eigval=True, **kw),
    "kda": lambda **kw: KimiDeltaAttention(features=12, num_heads=2, num_v_heads=4, head_dim=4, expand_v=1.5, conv_size=3,
                                           **kw),
}


# slow: the op tests check xla against reference (gradients included) and the fla fixture
# tests run the layers on both backends in CI
@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_xla_equals_reference_through_the_layer(kind):
    """float64, T=13 in chunks of 4, an incoming state (all of it: conv tails and S) and
    resets at different steps per row: outputs, final states and the gradients of a loss
    of both with respect to the parameters, the input and the incoming state."""
    rng = np.random.default_rng(0)
    batch, time = 3, 13
    with jax.enable_x64(True):
        make = MIXERS[kind]
        ref = make(backend="reference", chunk_size=4, dtype=jnp.float64, param_dtype=jnp.float64)
        fast = make(backend="xla", chunk_size=4, dtype=jnp.float64, param_dtype=jnp.float64)
        x = jnp.asarray(rng.standard_normal((batch, time, 12)))
        params = perturbed(ref, x, rng)
        if kind == "kda":
            params["A_log"] = np.log(rng.uniform(0.2, 2.0, params["A_log"].shape))
        state0 = jax.tree.map(lambda s: 0.5 * jnp.asarray(rng.standard_normal(s.shape)), ref.initial_state(batch))
        resets = np.zeros((batch, time), bool)
        resets[0, 5] = resets[1, 0] = resets[1, 9] = True
        resets = jnp.asarray(resets)
        w_y = jnp.asarray(rng.standard_normal((batch, time, 12)))

        def loss(mixer):
            def f(p, x, s):
                y, s2 = mixer.apply({"params": p}, x, s, resets)
                return jnp.sum(y * w_y) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(s2)), (y, s2)

            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

        (_, (y_r, s_r)), g_r = loss(ref)(params, x, state0)
        (_, (y_x, s_x)), g_x = loss(fast)(params, x, state0)
    np.testing.assert_allclose(np.asarray(y_x), np.asarray(y_r), rtol=1e-9, atol=1e-10)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-10), s_x, s_r)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-9), g_x, g_r)
    assert float(np.abs(np.asarray(s_r.S)).max()) > 0.1


def test_inits_follow_fla():
    d = 64
    kda = KimiDeltaAttention(features=d, num_heads=2, num_v_heads=4, head_dim=16, expand_v=2.0)
    p = nn.meta.unbox(jax.jit(kda.init)(jax.random.key(0), jnp.zeros((1, 4, d))))["params"]
    A = np.exp(np.asarray(p["A_log"], np.float64))
    assert A.shape == (4,) and A.min() >= 1 - 1e-6 and A.max() <= 16 * (1 + 1e-6)
    dt = np.log1p(np.exp(np.asarray(p["dt_bias"], np.float64)))  # softplus(dt_bias) = the sampled dt, per channel
    assert dt.shape == (4, 16) and dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4) and dt.std() > 0.01
    np.testing.assert_array_equal(np.asarray(p["g_b_proj"]["bias"]), np.zeros((4, 32)))
    np.testing.assert_array_equal(np.asarray(p["o_norm"]["scale"]), np.ones(32))
    for name, shape in [("q_proj", (d, 2, 16)), ("v_proj", (d, 4, 32)), ("f_a_proj", (d, 32)), ("f_b_proj", (32, 4, 16)),
                        ("g_a_proj", (d, 32)), ("g_b_proj", (32, 4, 32)), ("b_proj", (d, 4)), ("o_proj", (4, 32, d))]:
        w = np.asarray(p[name]["kernel"])
        assert w.shape == shape and abs(w.std() - 0.02) < 0.005, (name, w.shape, w.std())
    dn = DeltaNet(features=d, num_heads=4, expand_v=2.0)
    p = nn.meta.unbox(jax.jit(dn.init)(jax.random.key(0), jnp.zeros((1, 4, d))))["params"]
    assert set(p) == {"q_proj", "k_proj", "v_proj", "b_proj", "q_conv1d", "k_conv1d", "v_conv1d", "o_norm", "o_proj"}
    assert p["v_proj"]["kernel"].shape == (d, 4, 32) and p["q_conv1d"]["kernel"].shape == (4, d)
    assert abs(float(np.asarray(p["q_proj"]["kernel"]).std()) - 0.02) < 0.004


# --- the contract ----------------------------------------------------------------------------------------


def _floats(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make


def tiny_deltanet(**kw):
    return DeltaNet(features=8, num_heads=2, conv_size=3, chunk_size=4, **kw)


def tiny_kda(**kw):
    return KimiDeltaAttention(features=8, num_heads=2, num_v_heads=4, head_dim=4, conv_size=3, chunk_size=4, **kw)


def test_deltanet_mixer_contract():
    check_layer_contract(tiny_deltanet, _floats(8))


def test_kda_mixer_contract():
    check_layer_contract(tiny_kda, _floats(8))


@pytest.mark.slow
def test_deltanet_mixer_without_convs_contract():
    check_layer_contract(lambda **kw: tiny_deltanet(use_short_conv=False, use_gate=True, **kw), _floats(8))


@pytest.mark.slow
@pytest.mark.parametrize("block_cls,tiny", [(DeltaNetBlock, tiny_deltanet), (KimiDeltaAttentionBlock, tiny_kda)])
def test_block_contract(block_cls, tiny):
    check_layer_contract(
        lambda dtype=None, param_dtype=jnp.float32, **kw: block_cls(
            mixer=tiny(dtype=dtype, param_dtype=param_dtype, parent=None), intermediate_size=16, **kw),
        _floats(8),
    )


@pytest.mark.parametrize("block_cls,tiny", [(DeltaNetBlock, tiny_deltanet), (KimiDeltaAttentionBlock, tiny_kda)])
def test_block_is_prenorm_mixer_then_swiglu_mlp(block_cls, tiny):
    """x + Mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(.)) (fla's blocks), state = the mixer's."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 8)), jnp.float32)
    block = block_cls(mixer=tiny(parent=None), intermediate_size=16)
    variables = block.init(jax.random.key(0), x)
    p = nn.meta.unbox(variables)["params"]
    y, state = jax.jit(block.apply)(variables, x)

    def rms(u, scale):
        return u / jnp.sqrt(jnp.mean(u**2, -1, keepdims=True) + 1e-6) * scale

    m, m_state = tiny().apply({"params": p["mixer"]}, rms(x, p["attn_norm"]["scale"]))
    h = x + m
    u = rms(h, p["mlp_norm"]["scale"])
    mlp = p["mlp"]
    want = h + (jax.nn.silu(u @ mlp["gate"]["kernel"]) * (u @ mlp["up"]["kernel"])) @ mlp["down"]["kernel"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), state, m_state)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["deltanet-tiny", "kda-tiny"])
def test_lm_contract(preset):
    check_layer_contract(model_factory(preset, d_model=16, n_layers=1, chunk_size=4), tokens(64), input_name="inputs")


# --- presets and options ---------------------------------------------------------------------------


def deltanet_lm_count(d, n_layers, vocab, heads, mlp, tied, expand_k=1.0, expand_v=1.0, W=4):
    """fla's DeltaNetForCausalLM (no gate): per layer q/k (d x d expand_k each), v (d x d
    expand_v), b (d x H), three convs (W per channel), o_norm (d_v), o_proj, two RMSNorms and a
    SwiGLU MLP (3 d mlp); embedding, final norm, head."""
    kd, vd = int(d * expand_k), int(d * expand_v)
    mixer = 2 * d * kd + d * vd + d * heads + W * (2 * kd + vd) + vd // heads + vd * d
    return vocab * d * (1 if tied else 2) + n_layers * (mixer + 2 * d + 3 * d * mlp) + d


def kda_lm_count(d, n_layers, vocab, heads, head_dim, mlp, tied, expand_v=1.0, W=4):
    """fla's KDAForCausalLM: per layer q/k (d x H d_k each), v (d x H d_v), convs, f_proj
    (d x d_v, d_v x H d_k), b (d x H), A_log (H), dt_bias (H d_k), g_proj (d x d_v, d_v x H
    d_v + bias), o_norm (d_v), o_proj (H d_v x d), two RMSNorms and the SwiGLU MLP."""
    dk, dv = head_dim, int(head_dim * expand_v)
    mixer = 2 * d * heads * dk + d * heads * dv + W * (2 * heads * dk + heads * dv)
    mixer += d * dv + dv * heads * dk + d * heads + heads + heads * dk
    mixer += d * dv + dv * heads * dv + heads * dv + dv + heads * dv * d
    return vocab * d * (1 if tied else 2) + n_layers * (mixer + 2 * d + 3 * d * mlp) + d


@pytest.mark.slow
def test_presets_have_fla_layouts():
    sizes = {}
    for name in ("deltanet-125m", "kda-125m"):
        shapes = jax.eval_shape(mnemax.create(name).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        sizes[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    # fla's GatedMLP width at d 768: 256 ceil(int(2/3 * 4 * 768) / 256) = 2048
    assert sizes["deltanet-125m"] == deltanet_lm_count(768, 12, 50280, 6, 2048, tied=True) == 123_736_320
    assert sizes["kda-125m"] == kda_lm_count(768, 12, 50280, 6, 128, 2048, tied=True) == 128_473_416
    state = jax.eval_shape(lambda: mnemax.create("deltanet-125m").initial_state(2))
    assert state.blocks[0].S.shape == (2, 6, 128, 128) and state.blocks[0].conv_v.shape == (2, 3, 768)
    state = jax.eval_shape(lambda: mnemax.create("kda-125m").initial_state(2))
    assert state.blocks[0].S.shape == (2, 6, 128, 128) and state.blocks[0].conv_q.shape == (2, 3, 768)


@pytest.mark.slow
def test_tiny_presets_run():
    for name in ("deltanet-tiny", "kda-tiny"):
        model = mnemax.create(name, n_layers=1)
        tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 5)), jnp.int32)
        variables = jax.jit(model.init)(jax.random.key(0), tok)
        logits, _ = jax.jit(model.apply)(variables, tok)
        assert logits.shape == (2, 5, 64) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("preset,option,value,message", [
    ("deltanet-tiny", "expand_k", 0.3, r"expand_k must be a ratio making d_model \* expand_k an integer divisible"),
    ("deltanet-tiny", "qk_activation", "gelu", r"qk_activation must be one of \('silu', 'relu', 'elu', 'identity'\)"),
    ("deltanet-tiny", "qk_norm", "l1", r"qk_norm must be one of \('l2', 'sum'\)"),
    ("deltanet-tiny", "num_heads", 0, r"num_heads must be an integer >= 1"),
    ("deltanet-tiny", "intermediate_size", -1, r"intermediate_size must be an integer >= 0"),
    ("kda-tiny", "num_v_heads", 3, r"num_v_heads must be a multiple of num_heads \(2\), got 3"),
    ("kda-tiny", "expand_v", 0.01, r"expand_v must be .*head_dim \* expand_v a positive integer"),
    ("kda-tiny", "A_init_range", (0.0, 16.0), r"A_init_range must be \(low, high\) with 0 < low <= high"),
    ("kda-tiny", "dt_max", 1e-4, r"dt_max must be >= dt_min"),
    ("kda-tiny", "mlp_kind", "relu", r"mlp_kind must be one of"),
])
def test_a_bad_option_is_named(preset, option, value, message):
    with pytest.raises(ValueError, match=message):
        model = mnemax.create(preset, **{option: value})
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("make,option,value,message", [
    (DeltaNet, "expand_k", 0.3, r"expand_k must make features \* expand_k an integer divisible by num_heads"),
    (DeltaNet, "expand_v", 0.625, r"expand_v must make features \* expand_v an integer divisible by num_heads"),
    (DeltaNet, "num_heads", 0, r"num_heads must be a positive integer"),
    (DeltaNet, "qk_activation", "tanh", r"qk_activation must be one of"),
    (DeltaNet, "qk_norm", None, r"qk_norm must be one of"),
    (DeltaNet, "conv_size", 0, r"conv_size must be a positive integer"),
    (DeltaNet, "norm_eps", 0.0, r"norm_eps must be > 0"),
    (KimiDeltaAttention, "num_v_heads", 3, r"num_v_heads must be a multiple of num_heads \(2\), got 3"),
    (KimiDeltaAttention, "expand_v", 0.3, r"expand_v must make head_dim \* expand_v a positive integer"),
    (KimiDeltaAttention, "head_dim", 0, r"head_dim must be a positive integer"),
    (KimiDeltaAttention, "A_init_range", (2.0, 1.0), r"A_init_range must be \(low, high\)"),
    (KimiDeltaAttention, "dt_min", 0.5, r"dt_min and dt_max must satisfy"),
    (KimiDeltaAttention, "chunk_size", 0, r"chunk_size must be a positive integer"),
])
def test_the_mixer_names_a_bad_field(make, option, value, message):
    base = {"features": 8, "num_heads": 2} if make is DeltaNet else {"features": 8, "num_heads": 2, "head_dim": 4}
    mixer = make(**{**base, option: value})
    with pytest.raises(ValueError, match=message):
        mixer.initial_state(1)
    with pytest.raises(ValueError, match=message):
        mixer.init(jax.random.key(0), jnp.zeros((1, 3, 8)))
