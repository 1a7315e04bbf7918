"""Converted PyPI ``xlstm`` 2.0.6 weights give upstream's logits (fixtures written by
tests/fixtures/make_xlstm_fixtures.py with torch on CPU), and the full-size presets have
upstream's parameter counts (recorded there on torch's meta device)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.convert import xlstm_config_from_torch, xlstm_from_torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def load(name):
    z = np.load(os.path.join(FIXTURES, name))
    return z, json.loads(str(z["config"]))


def prefixed(z, prefix):
    return {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}


def max_err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)))


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_neurips_stack_logits_match_fixture():
    """xLSTMLMModel with mLSTM blocks at 0, 2 and an sLSTM block at 1 (slstm_at=[1]);
    the sLSTM weights also in the CUDA backend's storage layout."""
    z, cfg = load("xlstm_neurips.npz")
    mcfg, variables = xlstm_from_torch(prefixed(z, "param/"), cfg)
    assert mcfg.family == "xlstm" and mcfg.block["slstm_at"] == (1,)
    model = mnemax.build(mcfg)
    assert count(variables) == int(z["param_count"])
    apply = jax.jit(model.apply)
    logits, _ = apply(variables, jnp.asarray(z["tokens"]))
    assert max_err(logits, z["logits"]) <= 1e-4

    cuda_cfg = json.loads(json.dumps(cfg))
    cuda_cfg["slstm_block"]["slstm"]["backend"] = "cuda"
    sd = {**prefixed(z, "param/"), **prefixed(z, "cuda_layout/")}
    _, cuda_vars = xlstm_from_torch(sd, cuda_cfg)
    logits, _ = apply(cuda_vars, jnp.asarray(z["tokens"]))
    assert max_err(logits, z["logits"]) <= 1e-4


def test_xlstm_large_logits_and_states_match_fixture():
    """xLSTMLarge (7B layout) run with return_last_states=True: logits of a 16-token call,
    the (C, n, m) state of every block, logits of 8 more tokens from that state, an odd
    length (13), and the same weights stored with weight_mode="fused"."""
    z, cfg = load("xlstm_large.npz")
    mcfg, variables = xlstm_from_torch(prefixed(z, "param/"), cfg)
    assert mcfg.family == "xlstm_large" and mcfg.logit_soft_cap == 30.0
    assert count(variables) == int(z["param_count"])
    apply = jax.jit(mnemax.build(mcfg).apply)
    tok = jnp.asarray(z["tokens"])
    logits, state = apply(variables, tok[:, :16])
    assert max_err(logits, z["logits"]) <= 1e-4
    for b, block_state in enumerate(state.blocks):
        for j, leaf in enumerate(block_state):
            want = z[f"state/{b}/{j}"]
            assert max_err(np.asarray(leaf).reshape(want.shape), want) <= 1e-4 * max(1.0, np.abs(want).max())
    cont, _ = apply(variables, tok[:, 16:], state)
    assert max_err(cont, z["logits_continued"]) <= 1e-4
    odd, _ = apply(variables, tok[:, :13])
    assert max_err(odd, z["logits_odd"]) <= 1e-4

    sd = prefixed(z, "param/")
    for b in range(mcfg.n_layers):  # drop the single-layout entries the fused ones replace
        layer, ffn = f"backbone.blocks.{b}.mlstm_layer.", f"backbone.blocks.{b}.ffn."
        for name in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact"):
            sd.pop(layer + name + ".weight")
        sd.pop(layer + "igate_preact.bias"), sd.pop(layer + "fgate_preact.bias")
        sd.pop(ffn + "proj_up_gate.weight"), sd.pop(ffn + "proj_up.weight")
    sd.update(prefixed(z, "fused/"))
    _, fused_vars = xlstm_from_torch(sd, {**cfg, "weight_mode": "fused"})
    logits, _ = apply(fused_vars, tok[:, :16])
    assert max_err(logits, z["logits"]) <= 1e-4


def test_converter_rejects_bad_inputs():
    z, cfg = load("xlstm_neurips.npz")
    sd = prefixed(z, "param/")
    with pytest.raises(ValueError, match="lm_head.weight"):
        xlstm_from_torch({k: v for k, v in sd.items() if k != "lm_head.weight"}, cfg)
    bad = dict(sd)
    bad["token_embedding.weight"] = bad["token_embedding.weight"][:, :-1]
    with pytest.raises(ValueError, match="shape"):
        xlstm_from_torch(bad, cfg)
    with pytest.raises(ValueError, match="bias"):
        xlstm_config_from_torch({**cfg, "bias": True})
    with pytest.raises(ValueError, match="config"):
        xlstm_config_from_torch({"hello": 1})


@pytest.mark.parametrize("preset", ["xlstm-7b", "xlstm-1.3b", "xlstm-125m"])
def test_full_size_param_counts_match_upstream(preset):
    """jax.eval_shape builds the preset without allocating; its parameter count equals
    PyPI xlstm's model at the same config (built on torch's meta device)."""
    counts = json.load(open(os.path.join(FIXTURES, "xlstm_param_counts.json")))
    want = counts[preset]["count"]
    # The preset, and the model converted from upstream's recorded config, both match.
    for model in (mnemax.create(preset), mnemax.build(xlstm_config_from_torch(counts[preset]["config"]))):
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
        assert count(shapes) == want
    if preset == "xlstm-7b":
        assert want == 6_865_424_896
