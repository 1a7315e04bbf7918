"""Mamba: the mixer equals a Python transcription of the reference forward; HF
``transformers`` weights convert and reproduce the HF logits (fixtures written by
tests/fixtures/make_mamba_fixtures.py); the mixer and the LM pass the contract; reference
inits; the mamba-130m preset has the published layout's parameter count."""

import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.convert import mamba_from_transformers
from mnemax.layers.ssm import MambaMixer

from .contract import check_layer_contract
from .test_models import model_factory, tokens

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def load_fixture(stem):
    f = np.load(FIXTURES / f"{stem}.npz")
    state_dict = {k[2:]: f[k] for k in f.files if k.startswith("w/")}
    return f, state_dict, json.loads(str(f["config_json"]))


def silu(v):
    return v / (1 + np.exp(-v))


def reference_mixer(p, u, d_state, d_conv, rank):
    """The reference forward (mamba_simple.Mamba / HF MambaMixer slow path) in numpy float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    batch, time, d = u.shape
    E = p["D"].shape[0]
    W_in = p["in_proj"]["kernel"].reshape(d, 2 * E)
    xz = u @ W_in
    x, z = xz[..., :E], xz[..., E:]
    w, b = p["conv1d"]["kernel"], p["conv1d"]["bias"]
    xc = np.zeros_like(x)
    for t in range(time):
        for j in range(d_conv):
            s = t - (d_conv - 1) + j
            if s >= 0:
                xc[:, t] += w[j] * x[:, s]
    x = silu(xc + b)
    dbl = x @ p["x_proj"]["kernel"]
    dt_low, B, C = dbl[..., :rank], dbl[..., rank : rank + d_state], dbl[..., rank + d_state :]
    dt = np.log1p(np.exp(dt_low @ p["dt_proj"]["kernel"] + p["dt_bias"]))
    A = -np.exp(p["A_log"])
    h = np.zeros((batch, E, d_state))
    y = np.zeros((batch, time, E))
    for t in range(time):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        y[:, t] = np.einsum("ben,bn->be", h, C[:, t]) + p["D"] * x[:, t]
    y = y * silu(z)
    return y @ p["out_proj"]["kernel"], h


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_mixer_equals_reference_forward(backend):
    rng = np.random.default_rng(0)
    mixer = MambaMixer(features=8, d_state=5, d_conv=3, dt_rank=3, backend=backend, chunk_size=4)
    u = jnp.asarray(rng.standard_normal((2, 9, 8)), jnp.float32)
    v = mixer.init(jax.random.key(0), u)
    p = nn.meta.unbox(v)["params"]
    y, state = jax.jit(mixer.apply)(v, u)
    want_y, want_h = reference_mixer(p, np.asarray(u, np.float64), 5, 3, 3)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.ssm), want_h, rtol=1e-4, atol=1e-5)


def test_reference_inits():
    d, n_layers = 64, 4
    mixer = MambaMixer(features=d, d_state=16, n_layers=n_layers)
    p = nn.meta.unbox(mixer.init(jax.random.key(0), jnp.zeros((1, 4, d))))["params"]
    E, R = 2 * d, math.ceil(d / 16)
    np.testing.assert_array_equal(np.asarray(p["A_log"]), np.log(np.tile(np.arange(1, 17, dtype=np.float32), (E, 1))))
    np.testing.assert_array_equal(np.asarray(p["D"]), np.ones(E))
    dt = np.log1p(np.exp(np.asarray(p["dt_bias"], np.float64)))  # softplus(dt_bias) = the sampled dt
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert np.log(dt).std() > 0.5  # log-uniform over [log 1e-3, log 1e-1] has std 1.33
    bound = R**-0.5
    w = np.asarray(p["dt_proj"]["kernel"])
    assert w.shape == (R, E) and np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    w_out = np.asarray(p["out_proj"]["kernel"])
    assert np.abs(w_out).max() <= 1 / math.sqrt(E) / math.sqrt(n_layers)
    assert np.abs(w_out).max() > 0.8 / math.sqrt(E) / math.sqrt(n_layers)
    w_in = np.asarray(p["in_proj"]["kernel"])
    assert np.abs(w_in).max() <= 1 / math.sqrt(d) and np.abs(w_in).max() > 0.8 / math.sqrt(d)


@pytest.mark.parametrize("stem", ["mamba_hf_a", "mamba_hf_b"])
def test_converted_hf_weights_match_hf_logits(stem):
    """Logits from converted weights == HF MambaForCausalLM's (float32, max abs err <= 5e-6:
    measured 1.2e-6 with logits up to 4; a 1% error in one converted weight matrix, even
    dt_proj, moves them by >= 1e-5), in one call and token by token from the state."""
    f, state_dict, hf_config = load_fixture(stem)
    config, params = mamba_from_transformers(state_dict, hf_config)
    model = mnemax.build(config)
    ids = jnp.asarray(f["input_ids"])
    want = f["logits"]
    logits, _ = jax.jit(model.apply)(params, ids)
    err = float(np.abs(np.asarray(logits) - want).max())
    assert err <= 5e-6, f"{stem} ({f['transformers_version']}): max abs logit error {err:.2e}"
    # prefill half, then one token at a time from the state
    half = ids.shape[1] // 2
    step = jax.jit(model.apply)
    out, state = step(params, ids[:, :half])
    outs = [out]
    for t in range(half, ids.shape[1]):
        out, state = step(params, ids[:, t : t + 1], state)
        outs.append(out)
    err_step = float(np.abs(np.concatenate([np.asarray(o) for o in outs], axis=1) - want).max())
    assert err_step <= 5e-6, err_step
    # the parameter count torch reports (tied weights once)
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    assert count == int(f["torch_param_count"])


def test_converter_rejects_bad_state_dicts():
    f, state_dict, hf_config = load_fixture("mamba_hf_a")
    missing = {k: v for k, v in state_dict.items() if not k.endswith("layers.1.mixer.D")}
    with pytest.raises(ValueError, match="missing"):
        mamba_from_transformers(missing, hf_config)
    with pytest.raises(ValueError, match="does not map"):
        mamba_from_transformers({**state_dict, "backbone.extra.weight": np.zeros(3)}, hf_config)
    with pytest.raises(ValueError, match="hidden_act"):
        mamba_from_transformers(state_dict, {**hf_config, "hidden_act": "gelu"})
    bad = dict(state_dict)
    bad["backbone.layers.0.mixer.A_log"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        mamba_from_transformers(bad, hf_config)
    # the original mamba_ssm names (backbone.embedding) and a bare MambaModel both load
    renamed = {k.replace("embeddings", "embedding"): v for k, v in state_dict.items() if k != "lm_head.weight"}
    config, params = mamba_from_transformers(renamed, hf_config)
    assert config.tie_embeddings
    np.testing.assert_array_equal(np.asarray(params["params"]["embed"]["embedding"]), state_dict["backbone.embeddings.weight"])


def mamba_130m_count(d=768, n_layers=24, vocab=50280, N=16, W=4, expand=2):
    """The state-spaces/mamba-130m layout: tied embedding, per layer in_proj (2E x d),
    conv1d (E x 1 x W) + bias, x_proj ((R + 2N) x E), dt_proj (E x R) + bias, A_log (E x N),
    D (E), out_proj (d x E), norm (d); final norm (d)."""
    E, R = expand * d, math.ceil(d / 16)
    per_layer = 2 * E * d + E * W + E + (R + 2 * N) * E + E * R + E + E * N + E + d * E + d
    return vocab * d + n_layers * per_layer + d


def test_mamba_130m_builds_without_allocating_and_has_the_published_size():
    model = mnemax.create("mamba-130m")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == mamba_130m_count() == 129_135_360
    big = jax.eval_shape(mnemax.create("mamba-1.4b").init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(big)) == mamba_130m_count(d=2048, n_layers=48)
    state = jax.eval_shape(lambda: model.initial_state(2))
    assert state.blocks[0].ssm.shape == (2, 1536, 16) and state.blocks[0].conv.shape == (2, 3, 1536)


def test_mamba_mixer_contract():
    check_layer_contract(lambda **kw: MambaMixer(features=8, d_state=4, d_conv=3, chunk_size=4, **kw), _floats(8))


@pytest.mark.slow
def test_mamba_lm_contract():
    """-m slow: the LM wrapper has its contract in CI (test_models.py's transformer LM) and
    the mixer its own above."""
    check_layer_contract(model_factory("mamba-tiny", d_model=16, n_layers=1, chunk_size=4), tokens(64), input_name="inputs")


def _floats(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make
