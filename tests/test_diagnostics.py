"""Memory-fidelity diagnostics: closed-form cases (a delay line keeps every token for D steps,
a memoryless map keeps none, constant features carry nothing), the ridge readback against
numpy's least squares, and ETMF/ECLMF of Mamba and MemMamba LMs (identity blocks keep
fidelity 1 across depth; clearing the state at every step loses it along time)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax import diagnostics as dg


def delay_line(emb, depth):
    """features[:, t] = (emb[:, t], emb[:, t-1], ..., emb[:, t-depth+1]), zeros before the start."""
    B, T, E = emb.shape
    out = np.zeros((B, T, depth * E))
    for k in range(depth):
        out[:, k:, k * E : (k + 1) * E] = emb[:, : T - k]
    return out


def test_readback_closed_form_cases():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((64, 48, 6))
    layers = [delay_line(emb, 4), emb, np.zeros_like(emb)]
    grid = dg.etmf(layers, emb, range(7))
    assert grid.shape == (3, 7)
    assert np.all(grid[0, :4] > 0.999) and np.all(np.abs(grid[0, 4:]) < 0.05)  # holds each token 4 steps
    assert grid[1, 0] > 0.999 and np.all(np.abs(grid[1, 1:]) < 0.05)  # no memory beyond the token
    np.testing.assert_array_equal(grid[2], 0.0)  # constant features: the readback is the mean
    cos = dg.etmf(layers[:1], emb, range(6), metric="cosine")[0]
    assert np.all(cos[:4] > 0.999) and np.all(np.abs(cos[4:]) < 0.1)
    np.testing.assert_allclose(dg.eclmf([emb, 2 * emb + 1, np.zeros_like(emb)], emb), [1, 1, 0], atol=1e-3)


def test_readback_equals_least_squares_r2():
    """With ridge -> 0 the readback is ordinary least squares with an intercept, fitted on
    the first half of the rows and scored (R^2 about the fitted mean) on the second."""
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((6, 20, 5))
    targets = feats[..., :3] @ rng.standard_normal((3, 4)) + 0.5 * rng.standard_normal((6, 20, 4))
    d = 2
    x, y = feats[:, d:], targets[:, :-d]
    fit_x = np.concatenate([x[:3].reshape(-1, 5), np.ones((3 * 18, 1))], axis=1)
    coef, *_ = np.linalg.lstsq(fit_x, y[:3].reshape(-1, 4), rcond=None)
    pred = np.concatenate([x[3:].reshape(-1, 5), np.ones((3 * 18, 1))], axis=1) @ coef
    y_out, mean = y[3:].reshape(-1, 4), y[:3].reshape(-1, 4).mean(0)
    want = 1 - np.sum((y_out - pred) ** 2) / np.sum((y_out - mean) ** 2)
    np.testing.assert_allclose(dg.readback(feats, targets, d, ridge=1e-12), want, rtol=1e-8)
    with pytest.raises(ValueError, match="distance"):
        dg.readback(feats, targets, 20)
    with pytest.raises(ValueError, match="batch"):
        dg.readback(feats[:1], targets[:1], 0)


def _zero_out_proj(params):
    """Every Mamba block adds exactly zero to the stream (an identity model)."""
    p = nn.meta.unbox(params)
    return {k: ({**v, "mixer": {**v["mixer"], "out_proj": jax.tree.map(jnp.zeros_like, v["mixer"]["out_proj"])}}
                if k.startswith("block_") else v) for k, v in p.items()}


def test_fidelity_of_mamba_and_memmamba():
    tok = jnp.asarray(np.random.default_rng(2).integers(0, 64, (64, 24)), jnp.int32)
    every_step = jnp.ones(tok.shape, bool)
    mamba = mnemax.create("mamba-tiny")
    vm = jax.jit(mamba.init)(jax.random.key(0), tok)
    memmamba = mnemax.create("memmamba-tiny", read_init_scale=1.0)
    vmm = jax.jit(memmamba.init)(jax.random.key(1), tok)
    distances = range(4)
    for model, v in ((mamba, vm), (memmamba, vmm)):
        fid = dg.memory_fidelity(model, v, tok, distances)
        assert fid["etmf"].shape == (3, 4) and np.all(np.isfinite(fid["etmf"]))
        # layer 0 is the embedding table's rows for the tokens; ECLMF reads every layer back
        # onto them (computed here from the table, and through the eclmf path: no distance 0)
        table = np.asarray(nn.meta.unbox(v["params"])["embed"]["embedding"], np.float64)
        layers = dg.layer_outputs(model, v, tok)
        np.testing.assert_allclose(layers[0], table[np.asarray(tok)], rtol=1e-6)
        want = [dg.readback(f, table[np.asarray(tok)], 0) for f in layers]
        np.testing.assert_allclose(fid["eclmf"], want, rtol=1e-9)
        np.testing.assert_allclose(dg.memory_fidelity(model, v, tok, (1, 2))["eclmf"], want, rtol=1e-9)
        assert fid["eclmf"][0] > 0.999 and fid["eclmf"][-1] < 0.999
        # a state cleared before every token (pools too) keeps nothing along time
        cleared = dg.memory_fidelity(model, v, tok, distances, resets=every_step)
        assert np.all(np.abs(cleared["etmf"][:, 1:]) < 0.1), cleared["etmf"]
    # identity blocks: every layer's output is the embedding -> ECLMF 1 at every depth
    ident = dg.memory_fidelity(mamba, {"params": _zero_out_proj(vm["params"])}, tok, distances)
    assert np.all(ident["eclmf"] > 0.999) and np.all(np.abs(ident["etmf"][:, 1:]) < 0.1)
    # MemMamba that never writes a note has Mamba's fidelity, to the last bit
    silent = mnemax.create("memmamba-tiny", read_init_scale=1.0, note_threshold=1.0)
    params = {**nn.meta.unbox(vmm["params"])}
    for k, sub in nn.meta.unbox(vm["params"]).items():
        params[k] = {**params[k], **sub} if k.startswith("block_") else sub
    np.testing.assert_array_equal(
        dg.memory_fidelity(silent, {"params": params}, tok, distances)["etmf"], dg.memory_fidelity(mamba, vm, tok, distances)["etmf"]
    )
