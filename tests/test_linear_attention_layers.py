"""GLA, RetNet and Lightning attention layers (:mod:`mnemax.layers.linear_attention`): fla 0.6.0
layers' weights convert (:func:`mnemax.convert.fla.linear_attention_from_fla`) and reproduce
their outputs and final states (fixture written by tests/fixtures/make_fla_gla_layers.py,
fla's Triton kernels replaced by its naive references); the ``xla`` backend equals
``reference`` through the layers; the mixers and blocks pass the layer contract (blocks and
LMs under ``-m slow``); the presets have fla's layout; bad options raise naming the field."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.convert.fla import linear_attention_from_fla
from mnemax.layers import (
    GatedLinearAttention,
    GatedLinearAttentionBlock,
    LightningAttention,
    LightningAttentionBlock,
    MultiScaleRetention,
    MultiScaleRetentionBlock,
)
from mnemax.layers.delta_net import fla_mlp_width
from mnemax.layers.linear_attention import lightning_log_decay, retention_log_decay

from .contract import check_layer_contract
from .test_models import model_factory, tokens

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "fla_gla_layers.npz"
CASES = ("gla", "gla_gqa_nogate", "retnet", "retnet_gqa_nogate", "lightning", "gla_block", "gla_conv")


def max_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


def load_case(case):
    f = np.load(FIXTURE)
    state_dict = {k[len(case) + 3:]: f[k] for k in f.files if k.startswith(f"{case}/w/")}
    return f[f"{case}/x"], f[f"{case}/y"], f[f"{case}/state"], json.loads(str(f[f"{case}/config_json"])), state_dict


def mnemax_module(case, cfg, **options):
    """The mnemax module of a fixture case, from the fla constructor's keywords."""
    pick = lambda *names: {n: cfg[n] for n in names if n in cfg}  # noqa: E731
    common = ("num_heads", "num_kv_heads", "expand_k", "expand_v", "use_output_gate", "norm_eps")
    if case == "gla_block":
        mixer = GatedLinearAttention(features=cfg["hidden_size"], **pick("num_heads", "norm_eps"), **options, parent=None)
        return GatedLinearAttentionBlock(mixer=mixer, norm_eps=cfg["norm_eps"], intermediate_size=cfg["intermediate_size"])
    if case.startswith("gla"):
        return GatedLinearAttention(
            features=cfg["hidden_size"], **pick(*common, "gate_low_rank_dim", "gate_logit_normalizer", "clamp_min",
                                                "use_short_conv", "conv_size", "conv_bias"), **options)
    if case.startswith("retnet"):
        return MultiScaleRetention(features=cfg["hidden_size"], **pick(*common), **options)
    return LightningAttention(features=cfg["hidden_size"], num_heads=cfg["num_heads"], layer_idx=cfg["layer_idx"],
                              num_layers=cfg["num_layers"], norm_eps=cfg["eps"], **options)


# --- the fla fixture ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("case", CASES)
def test_converted_fla_layer_matches_its_outputs_and_final_state(case, backend):
    """B=2, T=21 (chunk 8: not a multiple), d=32: outputs and final state to <= 1e-4 in float32
    (measured <= 4e-6 with outputs up to 5.6 and states up to 20)."""
    x, y, S, cfg, state_dict = load_case(case)
    module = mnemax_module(case, cfg, backend=backend, chunk_size=8)
    params = linear_attention_from_fla(module, state_dict)
    got, state = jax.jit(module.apply)(params, jnp.asarray(x))
    assert max_err(got, y) <= 1e-4 and max_err(state.S, S) <= 1e-4
    assert float(np.abs(S).max()) > 1.0 and float(np.abs(y).max()) > 1.0  # a state that carries information


@pytest.mark.parametrize("case", ["retnet", "gla"])
def test_fla_outputs_streamed_in_pieces(case):
    """The sequence in pieces (9, 1, 11) with the state carried gives fla's full-sequence outputs
    (RetNet: the rotary position travels in the state)."""
    x, y, S, cfg, state_dict = load_case(case)
    module = mnemax_module(case, cfg, backend="xla", chunk_size=4)
    params = linear_attention_from_fla(module, state_dict)
    apply, state, outs, t = jax.jit(module.apply), None, [], 0
    for n in (9, 1, 11):
        out, state = apply(params, jnp.asarray(x[:, t : t + n]), state)
        outs.append(out)
        t += n
    assert max_err(jnp.concatenate(outs, axis=1), y) <= 1e-4 and max_err(state.S, S) <= 1e-4
    if case == "retnet":
        np.testing.assert_array_equal(np.asarray(state.pos), [21, 21])


def test_converter_rejects_bad_state_dicts():
    _, _, _, cfg, state_dict = load_case("gla")
    module = mnemax_module("gla", cfg)
    with pytest.raises(ValueError, match="missing 'gk_proj.1.bias'"):
        linear_attention_from_fla(module, {k: v for k, v in state_dict.items() if k != "gk_proj.1.bias"})
    with pytest.raises(ValueError, match=r"does not map to GatedLinearAttention: \['g_norm.weight'\]"):
        linear_attention_from_fla(module, {**state_dict, "g_norm.weight": np.ones(16)})
    with pytest.raises(ValueError, match=r"q_proj.weight'\] must have shape \(16, 32\)"):
        linear_attention_from_fla(module, {**state_dict, "q_proj.weight": np.zeros((32, 32))})
    with pytest.raises(TypeError, match="module must be"):
        linear_attention_from_fla(GatedLinearAttentionBlock, state_dict)
    # the short convs map only to a module with use_short_conv, from fla's (C, 1, W) layout
    _, _, _, cfg_conv, sd_conv = load_case("gla_conv")
    convs = {k: v for k, v in sd_conv.items() if "conv1d" in k}
    with pytest.raises(ValueError, match=r"does not map to GatedLinearAttention: \['k_conv1d.bias', 'k_conv1d.weight'"):
        linear_attention_from_fla(module, {**state_dict, **convs})
    with pytest.raises(ValueError, match=r"k_conv1d.weight'\] must have shape \(16, 1, 3\)"):
        linear_attention_from_fla(mnemax_module("gla_conv", cfg_conv),
                                  {**sd_conv, "k_conv1d.weight": sd_conv["k_conv1d.weight"][:, :, :2]})
    # one layer of a model's state_dict, by prefix
    prefixed = {f"model.layers.0.attn.{k}": v for k, v in state_dict.items()}
    prefixed["model.embeddings.weight"] = np.zeros((8, 32), np.float32)
    got = linear_attention_from_fla(module, prefixed, prefix="model.layers.0.attn.")
    jax.tree.map(np.testing.assert_array_equal, got, linear_attention_from_fla(module, state_dict))


def test_fixed_decays():
    """RetNet's gamma_h = 1 - 2^(-5-h); Lightning's -(8 h / H)(1 - l / L) (fla's ops)."""
    np.testing.assert_allclose(np.exp(retention_log_decay(3)), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128], rtol=1e-15)
    np.testing.assert_allclose(lightning_log_decay(4, 1, 3), [0.0, -4 / 3, -8 / 3, -4.0], rtol=1e-15)


# --- backends, dtypes -------------------------------------------------------------------------------


def tiny_gla(**kw):
    return GatedLinearAttention(features=16, num_heads=2, num_kv_heads=1, gate_low_rank_dim=4, chunk_size=4, **kw)


def tiny_retnet(**kw):
    return MultiScaleRetention(features=16, num_heads=2, expand_k=0.5, expand_v=1.0, chunk_size=4, **kw)


def tiny_lightning(**kw):
    return LightningAttention(features=16, num_heads=2, layer_idx=1, num_layers=2, chunk_size=4, **kw)


def tiny_gla_conv(**kw):  # fla's use_short_conv: width-4 convs + SiLU on q, k, v, their taps in the state
    return tiny_gla(use_short_conv=True, **kw)


MIXERS = {"gla": tiny_gla, "gla_conv": tiny_gla_conv, "retnet": tiny_retnet, "lightning": tiny_lightning}


def _floats(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make


# slow: the op tests check xla against reference (gradients included) and the fla fixture
# tests run the layers on both backends in CI
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_xla_backend_equals_reference_through_the_layer(name):
    """Outputs, final state and parameter gradients, with an incoming state, resets (one at
    step 0) and 13 steps over chunks of 4; float32 to 1e-5 / 1e-4."""
    rng = np.random.default_rng(0)
    make = MIXERS[name]
    x = jnp.asarray(rng.standard_normal((3, 13, 16)), jnp.float32)
    resets = np.zeros((3, 13), bool)
    resets[0, 5] = resets[1, 0] = resets[2, 9] = True
    resets = jnp.asarray(resets)
    ref, xla = make(backend="reference"), make(backend="xla")
    variables = ref.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + 0.2 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), variables)
    _, state = jax.jit(ref.apply)(variables, x)  # a non-trivial incoming state

    def run(module):
        def loss(v):
            y, s = module.apply(v, x, state, resets)
            return jnp.sum(jnp.sin(y)) + jnp.sum(s.S**2) * 1e-2, (y, s)

        return jax.jit(jax.grad(loss, has_aux=True))(variables)

    (g_ref, (y_ref, s_ref)), (g_xla, (y_xla, s_xla)) = run(ref), run(xla)
    np.testing.assert_allclose(np.asarray(y_xla), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5), s_xla, s_ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4), g_xla, g_ref)
    assert float(jnp.abs(s_ref.S).max()) > 0.1


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_bfloat16_compute_keeps_a_float32_state(name):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    f32 = MIXERS[name](backend="xla")
    variables = f32.init(jax.random.key(0), x)
    y32, s32 = jax.jit(f32.apply)(variables, x)
    y16, s16 = jax.jit(MIXERS[name](backend="xla", dtype=jnp.bfloat16).apply)(variables, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and s16.S.dtype == jnp.float32
    assert max_err(y16, y32) <= 0.05 * float(jnp.abs(y32).max()) and max_err(s16.S, s32.S) <= 0.05 * float(jnp.abs(s32.S).max())


# --- the contract -----------------------------------------------------------------------------------


# gla_conv's contract is -m slow (17 s on CI): its convs are delta_net.short_conv, whose state
# and resets the DeltaNet, GDN and KDA contracts hold, and its GLA wiring is held to fla's
# use_short_conv by the gla_conv fixture case above
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "gla_conv" else n for n in sorted(MIXERS)])
def test_mixer_contract(name):
    check_layer_contract(MIXERS[name], _floats(16))


BLOCKS = {
    "gla": (GatedLinearAttentionBlock, tiny_gla),
    "retnet": (MultiScaleRetentionBlock, tiny_retnet),
    "lightning": (LightningAttentionBlock, tiny_lightning),
}


def _block_factory(name):
    block_cls, make_mixer = BLOCKS[name]

    def make(dtype=None, param_dtype=jnp.float32, **kw):
        return block_cls(mixer=make_mixer(dtype=dtype, param_dtype=param_dtype, parent=None), intermediate_size=16, **kw)

    return make


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_contract(name):
    check_layer_contract(_block_factory(name), _floats(16))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gla-tiny", "retnet-tiny", "lightning-tiny"])
def test_lm_contract(preset):
    check_layer_contract(model_factory(preset, d_model=16, n_layers=2, chunk_size=4), tokens(64), input_name="inputs")


def test_blocks_are_prenorm_mixer_then_swiglu_mlp():
    """x + Mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(.)), state = the mixer's (RetNet's block);
    fla's MLP widths (hidden_ratio 4 for GLA / Lightning, 2 for RetNet); no MLP at width 0."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    block = _block_factory("retnet")()
    variables = block.init(jax.random.key(0), x)
    p = nn.meta.unbox(variables)["params"]
    y, state = jax.jit(block.apply)(variables, x)

    def rms(u, scale):
        return u / jnp.sqrt(jnp.mean(u**2, -1, keepdims=True) + 1e-6) * scale

    m, m_state = tiny_retnet().apply({"params": p["mixer"]}, rms(x, p["attn_norm"]["scale"]))
    h = x + m
    u = rms(h, p["mlp_norm"]["scale"])
    mlp = p["mlp"]
    want = h + (jax.nn.silu(u @ mlp["gate"]["kernel"]) * (u @ mlp["up"]["kernel"])) @ mlp["down"]["kernel"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), state, m_state)
    assert GatedLinearAttentionBlock(mixer=GatedLinearAttention(features=768, parent=None)).mlp_width == 2048
    assert MultiScaleRetentionBlock(mixer=MultiScaleRetention(features=2048, parent=None)).mlp_width == 2816
    assert LightningAttentionBlock(mixer=LightningAttention(features=768, parent=None)).mlp_width == fla_mlp_width(768, 4)
    bare = GatedLinearAttentionBlock(mixer=tiny_gla(parent=None), hidden_ratio=0.0)
    assert set(nn.meta.unbox(bare.init(jax.random.key(0), x))["params"]) == {"attn_norm", "mixer"}


def test_inits_follow_fla():
    d = 64
    p = nn.meta.unbox(GatedLinearAttention(features=d).init(jax.random.key(0), jnp.zeros((1, 4, d))))["params"]
    for name, shape in [("q_proj", (d, 4, 8)), ("k_proj", (d, 4, 8)), ("v_proj", (d, 4, 16)), ("g_proj", (d, 4, 16)),
                        ("o_proj", (4, 16, d))]:
        w = np.asarray(p[name]["kernel"])
        assert w.shape == shape and abs(w.std() - 0.02) < 0.004, (name, w.shape, w.std())
    assert p["gk_proj_0"]["kernel"].shape == (d, 16) and p["gk_proj_1"]["kernel"].shape == (16, 4, 8)
    np.testing.assert_array_equal(np.asarray(p["gk_proj_1"]["bias"]), np.zeros((4, 8)))
    np.testing.assert_array_equal(np.asarray(p["g_norm_swish_gate"]["scale"]), np.ones(16))
    p = nn.meta.unbox(LightningAttention(features=d).init(jax.random.key(0), jnp.zeros((1, 4, d))))["params"]
    assert p["qkvu_proj"]["kernel"].shape == (d, 4, 8, 8) and p["out_proj"]["kernel"].shape == (8, 8, d)


# --- presets and options ---------------------------------------------------------------------------


def gla_lm_count(d, n_layers, vocab, heads, expand_k, expand_v, mlp, tied, rank=16):
    """fla's GLAForCausalLM: per layer q/k (d x d expand_k), v/g (d x d expand_v), the low-rank
    gate (d r + r d expand_k + d expand_k), g_norm (d_v), o_proj (d expand_v x d), two RMSNorms
    and a SwiGLU MLP (3 d mlp); embedding, final norm, head."""
    key, value = int(d * expand_k), int(d * expand_v)
    mixer = 2 * d * key + 2 * d * value + d * rank + rank * key + key + value // heads + value * d
    return vocab * d * (1 if tied else 2) + n_layers * (mixer + 2 * d + 3 * d * mlp) + d


def test_gla_125m_has_fla_layout():
    shapes = jax.eval_shape(mnemax.create("gla-125m").init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert size == gla_lm_count(768, 12, 50280, 4, 0.5, 1.0, 2048, tied=True) == 123_796_992
    state = jax.eval_shape(lambda: mnemax.create("gla-125m").initial_state(2))
    assert state.blocks[0].S.shape == (2, 4, 96, 192)


@pytest.mark.parametrize("preset", ["gla-tiny", "retnet-tiny", "lightning-tiny"])
def test_tiny_presets_build_and_run(preset):
    model = mnemax.create(preset)
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), tok)
    logits, state = jax.jit(model.apply)(variables, tok)
    assert logits.shape == (2, 9, 64) and bool(jnp.all(jnp.isfinite(logits)))
    assert jax.tree.structure(state) == jax.tree.structure(model.initial_state(2))


def test_lightning_blocks_get_their_depth():
    cfg = mnemax.get_config("lightning-tiny", n_layers=3)
    model = mnemax.build(cfg)
    assert [(model.block_template(i).mixer.layer_idx, model.block_template(i).mixer.num_layers) for i in range(3)] == [
        (0, 3), (1, 3), (2, 3)]
    with pytest.raises(ValueError, match="scan_layers=True needs the blocks"):
        mnemax.create("lightning-tiny", scan_layers=True).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("preset,option,value,message", [
    ("gla-tiny", "num_kv_heads", 3, r"num_kv_heads must be a divisor of num_heads \(2\), got 3"),
    ("gla-tiny", "clamp_min", 0.5, r"clamp_min must be None or a number <= 0"),
    ("gla-tiny", "gate_logit_normalizer", 0, r"gate_logit_normalizer must be a number > 0"),
    ("gla-tiny", "use_short_conv", "yes", r"use_short_conv must be a bool, got 'yes'"),
    ("gla-tiny", "conv_size", 0, r"conv_size must be an integer >= 1"),
    ("gla-tiny", "intermediate_size", -1, r"intermediate_size must be an integer >= 0"),
    ("retnet-tiny", "rope_base", -1.0, r"rope_base must be a number > 0"),
    ("retnet-tiny", "mlp_kind", "relu", r"mlp_kind must be one of"),
    ("lightning-tiny", "head_dim", 0, r"head_dim must be an integer >= 1 or None"),
    ("lightning-tiny", "chunk_size", 0, r"chunk_size must be an integer >= 1"),
])
def test_a_bad_option_is_named(preset, option, value, message):
    with pytest.raises(ValueError, match=message):
        mnemax.create(preset, **{option: value})


@pytest.mark.parametrize("cls,option,value,message", [
    (GatedLinearAttention, "expand_k", 0.3, r"expand_k must make features \* expand_k an integer divisible by num_heads"),
    (GatedLinearAttention, "num_kv_heads", 3, r"num_kv_heads must divide num_heads \(2\), got 3"),
    (GatedLinearAttention, "clamp_min", 0.1, r"clamp_min must be None or a number <= 0"),
    (GatedLinearAttention, "gate_low_rank_dim", 0, r"gate_low_rank_dim must be a positive integer"),
    (GatedLinearAttention, "conv_size", 0, r"conv_size must be a positive integer"),
    (MultiScaleRetention, "expand_k", 0.375, r"expand_k must make the key head width .* even"),
    (MultiScaleRetention, "expand_v", 0.1, r"expand_v must make features \* expand_v an integer"),
    (MultiScaleRetention, "norm_eps", 0.0, r"norm_eps must be a number > 0"),
    (LightningAttention, "num_heads", 3, r"num_heads must divide features \(16\) when head_dim is None"),
    (LightningAttention, "layer_idx", 2, r"layer_idx must be an integer in \[0, num_layers=2\)"),
    (LightningAttention, "num_layers", 0, r"num_layers must be a positive integer"),
])
def test_the_mixer_names_a_bad_field(cls, option, value, message):
    base = {GatedLinearAttention: dict(num_heads=2), MultiScaleRetention: dict(num_heads=2),
            LightningAttention: dict(num_heads=2, num_layers=2)}[cls]
    mixer = cls(**{"features": 16, **base, option: value})
    with pytest.raises(ValueError, match=message):
        mixer.initial_state(1)
    with pytest.raises(ValueError, match=message):
        mixer.init(jax.random.key(0), jnp.zeros((1, 3, 16)))
