"""Release bundles across config.json formats.

tests/fixtures/release_v1/ holds a bundle of every tiny preset written by main before the
families got typed configs (format ``mnemax-release/1``: ``config.block`` the family's
keyword table of that time) and outputs.npz, each model's outputs on a fixed input
(tests/fixtures/make_release_v1_bundles.py). Here: each of them loads with the current code
and gives those outputs (atol 1e-6 plus rtol 2e-6: the fixtures were computed at LLVM -O2, the
tests compile at -O0, ~10 float32 ulps apart at |y| ~ 1.5), its config is the preset's; a bundle written now
(``mnemax-release/2``) round-trips; a config.json naming a block option the family does not
have, or (v2) lacking one, fails with an error that names it.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import mnemax
from mnemax import release
from mnemax.release import ReleaseError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "release_v1")
# Where only bits are compared through one executable: compile as cheaply as XLA allows.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
V1_PRESETS = sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d)))


@pytest.fixture(scope="module")
def stored():
    with np.load(os.path.join(FIXTURES, "outputs.npz")) as f:
        return dict(f)


def test_the_fixtures_cover_every_family_of_then():
    """A v1 bundle of each of the ten families registered when they were written."""
    families = {json.load(open(os.path.join(FIXTURES, p, "config.json")))["family"] for p in V1_PRESETS}
    assert len(families) == 10 and families <= set(mnemax.list_families())


@pytest.mark.parametrize("preset", V1_PRESETS)
def test_a_v1_bundle_loads_and_gives_its_stored_outputs(preset, stored):
    path = os.path.join(FIXTURES, preset)
    assert release.read_config(path)["format"] == release.FORMAT_V1
    model, params = mnemax.load_pretrained(path)
    # the converted config is the preset's (the v1 table and the typed config agree on every option)
    assert model.config == mnemax.get_config(preset)
    x = stored[f"{preset}/inputs"]
    y, _ = model.apply(params, x)  # eagerly, as the fixtures were made (jit fuses differently)
    # float32 rounding of the same eager ops differs between CPUs: up to 1.8e-6 apart in
    # outputs of size ~2 (xlstm-7b-tiny on one CI machine); a wrong weight moves them by ~1e-1
    np.testing.assert_allclose(np.asarray(y), stored[f"{preset}/outputs"], rtol=2e-6, atol=5e-6)


def _rewrite(path, edit):
    """Applies ``edit`` to the bundle's parsed config.json and re-signs the bundle (so that
    only the content, not a checksum, is at fault)."""
    cfg_path = os.path.join(path, release.CONFIG)
    meta = json.load(open(cfg_path))
    edit(meta)
    with open(cfg_path, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    with open(os.path.join(path, release.CHECKSUMS), "w") as f:
        for rel in release.bundle_files(path):
            f.write(f"{release.sha256_file(os.path.join(path, rel))}  {rel}\n")


def _copy(tmp_path, preset="mamba-tiny"):
    dst = tmp_path / preset
    shutil.copytree(os.path.join(FIXTURES, preset), dst)
    return str(dst)


def test_upgrade_v1_fills_an_option_the_old_table_lacked(tmp_path, stored):
    """A v1 bundle from before an option existed (transformer's query_block removed from its
    table) loads with the option's default, and its outputs are the stored ones."""
    path = _copy(tmp_path, "transformer-tiny")
    _rewrite(path, lambda m: m["config"]["block"].pop("query_block"))
    meta = release.upgrade_v1(release.read_config(path))
    assert meta["format"] == release.FORMAT
    assert meta["config"]["block"]["query_block"] == mnemax.families.TransformerConfig().query_block == 256
    model, params = mnemax.load_pretrained(path)
    y, _ = model.apply(params, stored["transformer-tiny/inputs"])
    np.testing.assert_allclose(np.asarray(y), stored["transformer-tiny/outputs"], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_an_unknown_block_option_is_named(tmp_path, fmt):
    if fmt == "v1":
        path = _copy(tmp_path)
    else:
        path = str(tmp_path / "v2")
        model = mnemax.create("mamba-tiny")
        mnemax.save_pretrained(path, model, jax.jit(model.init)(jax.random.key(0), np.zeros((1, 3), np.int32)))
    _rewrite(path, lambda m: m["config"]["block"].update(d_staet=8))
    with pytest.raises(ReleaseError, match=r"config\.json in .*unknown block option\(s\) \['d_staet'\] for family 'mamba'"):
        mnemax.load_pretrained(path)


def test_a_v2_block_lacking_an_option_is_named(tmp_path):
    path = str(tmp_path / "v2")
    model = mnemax.create("s4d-tiny")
    mnemax.save_pretrained(path, model, jax.jit(model.init)(jax.random.key(0), np.zeros((1, 3), np.int32)))
    _rewrite(path, lambda m: m["config"]["block"].pop("a_init"))
    with pytest.raises(ReleaseError, match=r"lacks option\(s\) \['a_init'\] of family 's4d'"):
        mnemax.load_pretrained(path)


def test_a_bad_block_value_is_named(tmp_path):
    path = _copy(tmp_path)
    _rewrite(path, lambda m: m["config"]["block"].update(dt_init="uniform"))
    with pytest.raises(ReleaseError, match=r"dt_init must be one of \('random', 'constant'\), got 'uniform'"):
        mnemax.load_pretrained(path)


@pytest.mark.parametrize("preset", ["xlstm-tiny", "hopfield-small"])
def test_a_v2_bundle_round_trips(tmp_path, preset):
    """Written now: format 2, every block option of the family's config class in config.json
    (tuples as lists), loaded back to an equal config and equal outputs."""
    model = mnemax.create(preset, d_model=16, n_layers=2) if preset == "hopfield-small" else mnemax.create(preset)
    cfg = model.config
    rng = np.random.default_rng(0)
    if cfg.vocab_size:
        x = rng.integers(0, cfg.vocab_size, (2, 7)).astype(np.int32)
    else:
        x = rng.normal(size=(2, 7, cfg.input_dim)).astype(np.float32)
    params = jax.jit(model.init, compiler_options=FAST)(jax.random.key(0), x)
    path = mnemax.save_pretrained(str(tmp_path / preset), model, params)
    meta = release.read_config(path)
    assert meta["format"] == release.FORMAT == "mnemax-release/2"
    block = meta["config"]["block"]
    assert sorted(block) == sorted(type(cfg.block).option_names())
    assert block == json.loads(json.dumps(cfg.block.to_dict()))
    if preset == "xlstm-tiny":
        assert block["slstm_at"] == [1]
    loaded, loaded_params = mnemax.load_pretrained(path)
    assert loaded.config == cfg and type(loaded.config.block) is type(cfg.block)
    apply = jax.jit(lambda m, p, x: m.apply(p, x), static_argnums=0, compiler_options=FAST)  # one executable for both
    y0, _ = apply(model, params, x)
    y1, _ = apply(loaded, loaded_params, x)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
