"""Mamba-2: HF ``transformers`` weights convert and reproduce the HF logits, cache and
one-token decode (fixtures written by tests/fixtures/make_mamba2_fixtures.py); the mixer
equals a float64 numpy loop of the paper's equations (written here, independent of the
layer and the op) with resets and an incoming state; the mixer and block pass the layer
contract (the LM's contract is slow); reference inits; the presets' layouts; bad configs
name the field."""

import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.convert import mamba2_from_transformers
from mnemax.families import Mamba2Config
from mnemax.layers.mamba2 import Mamba2Block, Mamba2Mixer, Mamba2State

from .contract import check_layer_contract
from .test_models import model_factory, tokens

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def load_fixture(stem):
    f = np.load(FIXTURES / f"{stem}.npz")
    state_dict = {k[2:]: f[k] for k in f.files if k.startswith("w/")}
    return f, state_dict, json.loads(str(f["config_json"]))


# --- HF transformers fixtures ----------------------------------------------------------------


@pytest.mark.parametrize("stem,backend", [("mamba2_hf_a", "xla"), ("mamba2_hf_b", "xla"), ("mamba2_hf_b", "reference")])
def test_converted_hf_weights_match_hf_logits(stem, backend):
    """Logits from converted weights == HF Mamba2ForCausalLM's pure-PyTorch path (float32,
    max abs err <= 1e-5: measured 1.5e-6 with logits up to 3.1). Fixture b has n_groups 2,
    odd length 13, conv width 3 without bias, in/out biases, an untied head and eps 1e-6;
    chunk_size 4 makes the xla form cross chunk boundaries."""
    f, state_dict, hf_config = load_fixture(stem)
    config, params = mamba2_from_transformers(state_dict, hf_config)
    assert config.block.n_groups == hf_config["n_groups"] and config.block.dt_limit is None
    model = mnemax.build(config.replace(backend=backend, chunk_size=4))
    logits, _ = jax.jit(model.apply)(params, jnp.asarray(f["input_ids"]))
    err = float(np.abs(np.asarray(logits) - f["logits"]).max())
    assert err <= 1e-5, f"{stem} ({f['transformers_version']}, {backend}): max abs logit error {err:.2e}"
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert count == int(f["torch_param_count"])  # tied weights once


def test_hf_cache_and_decode_match():
    """Fixture a: after the prompt every layer's SSM state equals HF's
    ``cache/ssm_state/<l>`` ((batch, heads, head_dim, d_state) there, (batch, heads,
    d_state, head_dim) here) and its conv state the last d_conv - 1 columns of HF's
    ``cache/conv_state/<l>`` ((batch, conv_dim, d_conv) there, (batch, d_conv - 1,
    conv_dim) here); decoding the 3 ``decode_ids`` one at a time from it gives
    ``decode_logits`` and the ``decode_cache`` states (measured: states 8e-7, decode logits
    1.3e-6 off)."""
    f, state_dict, hf_config = load_fixture("mamba2_hf_a")
    config, params = mamba2_from_transformers(state_dict, hf_config)
    model = mnemax.build(config.replace(chunk_size=8))
    apply = jax.jit(model.apply)
    logits, state = apply(params, jnp.asarray(f["input_ids"]))
    assert float(np.abs(np.asarray(logits) - f["logits"]).max()) <= 1e-5

    def check_states(state, prefix):
        for i, s in enumerate(state.blocks):
            assert isinstance(s, Mamba2State)
            want_ssm = np.swapaxes(f[f"{prefix}/ssm_state/{i}"], 2, 3)
            np.testing.assert_allclose(np.asarray(s.ssm), want_ssm, rtol=1e-5, atol=1e-5, err_msg=f"{prefix} ssm {i}")
            want_conv = np.swapaxes(f[f"{prefix}/conv_state/{i}"][:, :, 1:], 1, 2)
            np.testing.assert_allclose(np.asarray(s.conv), want_conv, rtol=1e-5, atol=1e-5, err_msg=f"{prefix} conv {i}")

    check_states(state, "cache")
    ids = jnp.asarray(f["decode_ids"])
    outs = []
    for t in range(ids.shape[1]):
        out, state = apply(params, ids[:, t : t + 1], state)
        outs.append(np.asarray(out))
    err = float(np.abs(np.concatenate(outs, axis=1) - f["decode_logits"]).max())
    assert err <= 1e-5, f"decode logits: max abs error {err:.2e}"
    check_states(state, "decode_cache")


def test_converter_rejects_bad_state_dicts():
    f, state_dict, hf_config = load_fixture("mamba2_hf_b")
    missing = {k: v for k, v in state_dict.items() if not k.endswith("layers.1.mixer.D")}
    with pytest.raises(ValueError, match="missing"):
        mamba2_from_transformers(missing, hf_config)
    with pytest.raises(ValueError, match="does not map"):
        mamba2_from_transformers({**state_dict, "backbone.extra.weight": np.zeros(3)}, hf_config)
    with pytest.raises(ValueError, match="hidden_act"):
        mamba2_from_transformers(state_dict, {**hf_config, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_heads"):
        mamba2_from_transformers(state_dict, {**hf_config, "num_heads": 5})
    with pytest.raises(ValueError, match="lm_head"):
        mamba2_from_transformers({k: v for k, v in state_dict.items() if k != "lm_head.weight"}, hf_config)
    bad = dict(state_dict)
    bad["backbone.layers.0.mixer.A_log"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        mamba2_from_transformers(bad, hf_config)
    # a clip other than (0, inf) is carried over
    config, _ = mamba2_from_transformers(state_dict, {**hf_config, "time_step_limit": [0.001, 0.5]})
    assert config.block.dt_limit == (0.001, 0.5)
    # the original mamba_ssm names (backbone.embedding) and a bare Mamba2Model (tied) load
    f, state_dict, hf_config = load_fixture("mamba2_hf_a")
    renamed = {k.replace("embeddings", "embedding"): v for k, v in state_dict.items() if k != "lm_head.weight"}
    config, params = mamba2_from_transformers(renamed, hf_config)
    assert config.tie_embeddings and "head" not in params["params"]


# --- the equations in float64 numpy ------------------------------------------------------------


def silu(v):
    return v / (1 + np.exp(-v))


def softplus(v):
    return np.logaddexp(0.0, v)


def numpy_mixer(p, u, state, resets, *, d_state, d_conv, head_dim, n_groups, norm_eps, dt_limit=None):
    """Mamba-2's mixer, one step at a time (Dao & Gu 2024, Sec. 7 / mamba_ssm's Mamba2 in
    its recurrent ``step`` form), float64. ``state`` = (conv inputs (batch, d_conv - 1,
    conv_dim), SSM state (batch, heads, d_state, head_dim)); ``resets[b, t]`` starts a new
    sequence at t (conv taps before it read zeros, the SSM state restarts at zero)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    batch, time, _ = u.shape
    N, P, G, W = d_state, head_dim, n_groups, d_conv
    H = p["D"].shape[0]
    E = H * P
    proj = u @ p["in_proj"]["kernel"] + p["in_proj"].get("bias", 0.0)
    z, xBC, dt_raw = proj[..., :E], proj[..., E : 2 * E + 2 * G * N], proj[..., 2 * E + 2 * G * N :]
    conv_in, S = np.array(state[0], np.float64), np.array(state[1], np.float64)
    A = -np.exp(p["A_log"])
    y = np.zeros((batch, time, E))
    for b in range(batch):
        hist = list(conv_in[b])  # the last W - 1 pre-conv inputs, oldest first
        h = S[b].copy()  # (H, N, P)
        for t in range(time):
            if resets[b, t]:
                hist = [np.zeros_like(v) for v in hist]
                h = np.zeros_like(h)
            taps = hist + [xBC[b, t]]  # x_{t-W+1} ... x_t
            c = sum(p["conv1d"]["kernel"][j] * taps[j] for j in range(W)) + p["conv1d"].get("bias", 0.0)
            hist = taps[1:]
            c = silu(c)
            x, Bm, Cm = c[:E].reshape(H, P), c[E : E + G * N].reshape(G, N), c[E + G * N :].reshape(G, N)
            dt = softplus(dt_raw[b, t] + p["dt_bias"])
            if dt_limit is not None:
                dt = np.clip(dt, *dt_limit)
            o = np.zeros((H, P))
            for hd in range(H):
                j = hd // (H // G)
                h[hd] = np.exp(dt[hd] * A[hd]) * h[hd] + np.outer(dt[hd] * Bm[j], x[hd])
                o[hd] = h[hd].T @ Cm[j] + p["D"][hd] * x[hd]
            gated = o.reshape(E) * silu(z[b, t])
            grouped = gated.reshape(G, E // G)
            normed = grouped / np.sqrt(np.mean(grouped**2, axis=-1, keepdims=True) + norm_eps)
            y[b, t] = normed.reshape(E) * p["norm"]["scale"]
        conv_in[b] = np.reshape(hist, conv_in[b].shape)
        S[b] = h
    out = y @ p["out_proj"]["kernel"] + p["out_proj"].get("bias", 0.0)
    return out, (conv_in, S)


def _perturbed(params, rng):
    """The init moved off its special values (D = 1, norm scale = 1, zero biases)."""

    def move(path, a):
        name, a = path[-1].key, np.asarray(a)
        if name in ("A_log", "dt_bias"):
            return a + 0.3 * rng.standard_normal(a.shape)
        if name in ("D", "scale"):
            return 1.0 + 0.3 * rng.standard_normal(a.shape)
        if name == "bias":
            return 0.1 * rng.standard_normal(a.shape)
        return a

    return jax.tree_util.tree_map_with_path(move, params)


@pytest.mark.parametrize("backend,dt_limit,d_conv,use_bias", [
    ("xla", None, 4, False), ("reference", (0.05, 0.4), 3, True), ("xla", None, 1, True),
])
def test_mixer_equals_the_equations_in_float64(backend, dt_limit, d_conv, use_bias):
    """Random params, n_groups 2 (2 heads a group), an incoming conv and SSM state, resets
    mid-sequence and at step 0 of one row; outputs and both final states to 1e-9."""
    kw = dict(d_state=3, d_conv=d_conv, head_dim=4, n_groups=2, norm_eps=1e-5)
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        mixer = Mamba2Mixer(features=8, **kw, dt_limit=dt_limit, use_bias=use_bias, conv_bias=not use_bias,
                            backend=backend, chunk_size=4, dtype=jnp.float64, param_dtype=jnp.float64)
        batch, time = 3, 11
        u = rng.standard_normal((batch, time, 8))
        p = _perturbed(nn.meta.unbox(mixer.init(jax.random.key(0), jnp.asarray(u)))["params"], rng)
        s0 = Mamba2State(conv=rng.standard_normal((batch, d_conv - 1, 16 + 2 * 2 * 3)),
                         ssm=0.5 * rng.standard_normal((batch, 4, 3, 4)))
        resets = np.zeros((batch, time), bool)
        resets[0, 5] = resets[1, 0] = resets[1, 9] = True
        y, s = jax.jit(mixer.apply)({"params": p}, jnp.asarray(u), jax.tree.map(jnp.asarray, s0), jnp.asarray(resets))
        want_y, (want_conv, want_ssm) = numpy_mixer(p, u, s0, resets, dt_limit=dt_limit, **kw)
    assert y.dtype == s.ssm.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(s.ssm), want_ssm, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(s.conv), want_conv, rtol=1e-12, atol=1e-12)


def test_bfloat16_compute_stays_close_with_a_float32_state():
    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    mixer = Mamba2Mixer(features=16, d_state=8, head_dim=8, chunk_size=4)
    v = mixer.init(jax.random.key(0), u)
    y32, s32 = jax.jit(mixer.apply)(v, u)
    y16, s16 = jax.jit(Mamba2Mixer(features=16, d_state=8, head_dim=8, chunk_size=4, dtype=jnp.bfloat16).apply)(v, u)
    assert y16.dtype == jnp.bfloat16 and s16.ssm.dtype == s16.conv.dtype == jnp.float32
    scale = float(jnp.abs(y32).max())
    assert float(jnp.abs(y16.astype(jnp.float32) - y32).max()) <= 3e-2 * scale
    assert float(jnp.abs(s16.ssm - s32.ssm).max()) <= 3e-2 * float(jnp.abs(s32.ssm).max())


def test_pallas_kernels_with_a_whole_group_per_program_equal_the_reference(monkeypatch):
    """One group of B and C for 4 heads, the ``pallas_gpu`` kernels (interpret mode) with
    ``ChunkedConfig(group_heads=4)`` (all the group's heads in one program: ``q k^T`` once, dq
    and dk summed in the kernel): outputs, final SSM state and the gradients of every parameter
    equal the ``reference`` backend's to 1e-4 / 1e-3 of the largest entry (float32, three chunks
    of 16, an incoming state, a reset)."""
    from mnemax.kernels.chunked_gpu import ChunkedConfig

    monkeypatch.setenv("MNEMAX_PALLAS_INTERPRET", "1")
    rng = np.random.default_rng(4)
    u = jnp.asarray(rng.standard_normal((2, 37, 16)), jnp.float32)
    resets = jnp.zeros((2, 37), bool).at[1, 20].set(True)
    kw = dict(features=16, d_state=8, head_dim=8, n_groups=1, chunk_size=16)
    params = Mamba2Mixer(**kw).init(jax.random.key(0), u)
    s0 = Mamba2State(conv=jnp.asarray(rng.standard_normal((2, 3, 32 + 16)), jnp.float32),
                     ssm=jnp.asarray(0.5 * rng.standard_normal((2, 4, 8, 8)), jnp.float32))

    def run(**mixer_kw):
        mixer = Mamba2Mixer(**kw, **mixer_kw)

        def loss(p):
            y, state = mixer.apply(p, u, s0, resets)
            return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size) + jnp.sum(state.ssm), (y, state.ssm)

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, (y_ref, S_ref)), g_ref = run(backend="reference")
    (_, (y, S)), g = run(backend="pallas_gpu", kernel_config=ChunkedConfig(group_heads=4))
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1.0))  # noqa: E731
    assert rel(y, y_ref) < 1e-4 and rel(S, S_ref) < 1e-4, (rel(y, y_ref), rel(S, S_ref))
    errs = jax.tree.map(rel, g, g_ref)
    assert max(jax.tree.leaves(errs)) < 1e-3, errs


# --- inits, presets, configs ----------------------------------------------------------------------


def test_reference_inits():
    d, n_layers = 64, 4
    mixer = Mamba2Mixer(features=d, d_state=16, head_dim=8, n_layers=n_layers)
    p = nn.meta.unbox(mixer.init(jax.random.key(0), jnp.zeros((1, 4, d))))["params"]
    E, H = 2 * d, 16
    A = np.exp(np.asarray(p["A_log"], np.float64))
    assert A.shape == (H,) and A.min() >= 1.0 and A.max() <= 16.0 and A.std() > 2.0  # U(1, 16) has std 4.3
    np.testing.assert_array_equal(np.asarray(p["D"]), np.ones(H))
    np.testing.assert_array_equal(np.asarray(p["norm"]["scale"]), np.ones(E))
    dt = np.log1p(np.exp(np.asarray(p["dt_bias"], np.float64)))  # softplus(dt_bias) = the sampled dt
    assert dt.shape == (H,) and dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    w_out = np.abs(np.asarray(p["out_proj"]["kernel"]))
    assert w_out.max() <= 1 / math.sqrt(E * n_layers) and w_out.max() > 0.8 / math.sqrt(E * n_layers)
    w_in = np.abs(np.asarray(p["in_proj"]["kernel"]))
    assert w_in.shape == (d, E + (E + 2 * 16) + H) and 0.8 / math.sqrt(d) < w_in.max() <= 1 / math.sqrt(d)
    assert p["conv1d"]["kernel"].shape == (4, E + 2 * 16) and "bias" not in p["in_proj"]


def mamba2_count(d, n_layers, vocab=50288, N=128, P=64, G=1, W=4, expand=2):
    """The state-spaces/mamba2 layout: tied embedding; per layer in_proj ((2E + 2GN + H) x d),
    conv1d ((E + 2GN) x 1 x W) + bias, dt_bias, A_log, D (H each), gated norm (E),
    out_proj (d x E), norm (d); final norm (d)."""
    E = expand * d
    H, conv = E // P, E + 2 * G * N
    per_layer = (E + conv + H) * d + conv * W + conv + 3 * H + E + d * E + d
    return vocab * d + n_layers * per_layer + d


def test_presets_have_the_published_layouts():
    for name, d, n_layers in (("mamba2-130m", 768, 24), ("mamba2-1.3b", 2048, 48)):
        model = mnemax.create(name)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == mamba2_count(d, n_layers), name
    assert mamba2_count(768, 24) == 128_989_632
    state = jax.eval_shape(lambda: mnemax.create("mamba2-130m").initial_state(2))
    assert state.blocks[0].ssm.shape == (2, 24, 128, 64) and state.blocks[0].conv.shape == (2, 3, 1536 + 256)


@pytest.mark.parametrize("option,value,message", [
    ("d_state", 0, r"d_state must be an integer >= 1, got 0 \(Mamba2Config\)"),
    ("head_dim", 2.5, r"head_dim must be an integer >= 1"),
    ("n_groups", -1, r"n_groups must be an integer >= 1"),
    ("chunk_size", 0, r"chunk_size must be an integer >= 1"),
    ("dt_max", 1e-4, r"dt_max must be >= dt_min \(0\.001\)"),
    ("A_init_range", (0.0, 16.0), r"A_init_range must be a pair \(low, high\) with 0 < low <= high"),
    ("A_init_range", (1.0,), r"A_init_range must be a pair"),
    ("dt_limit", (0.5, 0.1), r"dt_limit must be None or a pair"),
])
def test_a_bad_option_is_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        mnemax.get_config("mamba2-tiny", **{option: value})
    with pytest.raises(ValueError, match=message):
        Mamba2Config(**{option: value})


def test_a_bad_norm_eps_is_named():
    # norm_eps is also a top-level field (the final norm's): an override sets that one
    assert mnemax.get_config("mamba2-tiny", norm_eps=1e-3).block.norm_eps == 1e-5
    with pytest.raises(ValueError, match=r"norm_eps must be a number > 0, got 0\.0 \(Mamba2Config\)"):
        Mamba2Config(norm_eps=0.0)


@pytest.mark.parametrize("option,value,message", [
    ("head_dim", 24, r"head_dim must be a divisor of d_inner = expand \* d_model = 64, got 24"),
    ("n_groups", 3, r"n_groups must be a divisor of the 4 heads, got 3"),
])
def test_widths_that_do_not_divide_are_named(option, value, message):
    model = mnemax.create("mamba2-tiny", **{option: value})
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))


@pytest.mark.parametrize("fields,message", [
    (dict(head_dim=5), "head_dim must divide d_inner"),
    (dict(head_dim=4, n_groups=3), "n_groups must divide the 4 heads"),
    (dict(d_conv=0), "d_conv must be an integer >= 1"),
    (dict(A_init_range=(2.0, 1.0)), "A_init_range must be"),
    (dict(dt_limit=(0.2, 0.1)), "dt_limit must be"),
    (dict(dt_min=0.2), "dt_max must be >= dt_min"),
])
def test_the_mixer_names_a_bad_field(fields, message):
    with pytest.raises(ValueError, match=message):
        Mamba2Mixer(features=8, **{"head_dim": 4, **fields}).initial_state(1)


def test_config_round_trips_through_json():
    cfg = mnemax.get_config("mamba2-tiny", dt_limit=(0.0, 0.3), n_groups=2)
    again = mnemax.ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and isinstance(again.block, Mamba2Config) and again.block.dt_limit == (0.0, 0.3)


# --- the layer contract ----------------------------------------------------------------------------


def _floats(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make


def _tiny_mixer(**kw):
    return Mamba2Mixer(features=8, d_state=4, d_conv=3, head_dim=4, n_groups=2, chunk_size=4, **kw)


def test_mamba2_mixer_contract():
    check_layer_contract(_tiny_mixer, _floats(8))


@pytest.mark.slow  # the mixer's contract plus the pre-norm residual MambaBlock shares (~45 s on the CI machine)
def test_mamba2_block_contract():
    def make(dtype=None, param_dtype=jnp.float32, **kw):
        return Mamba2Block(mixer=_tiny_mixer(dtype=dtype, param_dtype=param_dtype, parent=None), **kw)

    check_layer_contract(make, _floats(8))


@pytest.mark.slow
def test_mamba2_lm_contract():
    check_layer_contract(model_factory("mamba2-tiny", d_model=16, n_layers=1, head_dim=8, d_state=8, chunk_size=4),
                         tokens(64), input_name="inputs")
