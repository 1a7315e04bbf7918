"""Release bundles: round trip, checksums, config/params mismatch, restore onto a mesh."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.release import CHECKSUMS, ReleaseError, _sha256
from mnemax.sharding import make_mesh


@pytest.fixture()
def bundle(tmp_path):
    model = mnemax.create("transformer-tiny", d_model=32, num_heads=2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    path = str(tmp_path / "bundle")
    mnemax.save_pretrained(path, model, params, extra={"note": "test"})
    return model, nn.meta.unbox(params), path


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


def test_round_trip_and_files(bundle):
    model, params, path = bundle
    assert sorted(os.listdir(path)) == ["README.md", CHECKSUMS, "config.json", "params"]
    meta = json.load(open(os.path.join(path, "config.json")))
    assert meta["family"] == "transformer" and meta["preset"] == "transformer-tiny"
    assert meta["mnemax_version"] == mnemax.__version__ and meta["extra"] == {"note": "test"}
    assert "parameters:" in open(os.path.join(path, "README.md")).read()
    assert not any(f.endswith((".pkl", ".pickle")) for _, _, fs in os.walk(path) for f in fs)
    loaded_model, loaded = mnemax.load_pretrained(path)
    assert loaded_model.config == model.config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y0, _ = model.apply(params, TOKENS)
    y1, _ = loaded_model.apply(loaded, TOKENS)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))


def test_restore_onto_a_mesh(bundle):
    model, params, path = bundle
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded = mnemax.load_pretrained(path, mesh=mesh)
    emb = sharded["params"]["embed"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (32, 16)  # vocab 64 / tensor 2, embed 32 / fsdp 2
    y0, _ = model.apply(params, TOKENS)
    y1, _ = jax.jit(model.apply)(sharded, TOKENS)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)


def test_missing_file(bundle):
    _, _, path = bundle
    os.remove(os.path.join(path, "README.md"))
    with pytest.raises(FileNotFoundError, match="README.md"):
        mnemax.load_pretrained(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mnemax.load_pretrained(path + "-nope")


def test_checksum_mismatch(bundle):
    _, _, path = bundle
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "params")) for f in fs]
    victim = max(data_files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(ReleaseError, match="checksum mismatch"):
        mnemax.load_pretrained(path)


def test_config_that_does_not_fit(bundle):
    _, _, path = bundle
    cfg_path = os.path.join(path, "config.json")
    meta = json.load(open(cfg_path))
    meta["config"]["d_model"] = 48
    json.dump(meta, open(cfg_path, "w"))
    # re-sign so that only the config/params mismatch is left
    lines = open(os.path.join(path, CHECKSUMS)).read().splitlines()
    lines = [f"{_sha256(cfg_path)}  config.json" if l.endswith("  config.json") else l for l in lines]
    open(os.path.join(path, CHECKSUMS), "w").write("\n".join(lines) + "\n")
    with pytest.raises(ReleaseError, match="do not fit the config"):
        mnemax.load_pretrained(path)


def test_refuses_to_overwrite(bundle):
    model, params, path = bundle
    with pytest.raises(ReleaseError, match="not empty"):
        mnemax.save_pretrained(path, model, params)
    mnemax.save_pretrained(path, model, params, overwrite=True)
    mnemax.load_pretrained(path)
