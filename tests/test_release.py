"""Release bundles: round trip, checksums, config/params mismatch, restore onto a mesh;
overwrite replaces only a bundle or an empty directory; checksum entries stay inside the
bundle; malformed checksums.sha256 / config.json are named with the line or position."""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.release import CHECKSUMS, ReleaseError, sha256_file
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
    y0, _ = jax.jit(model.apply)(params, TOKENS)
    y1, _ = jax.jit(loaded_model.apply)(loaded, TOKENS)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))


def test_restore_onto_a_mesh(bundle):
    model, params, path = bundle
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded = mnemax.load_pretrained(path, mesh=mesh)
    emb = sharded["params"]["embed"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (32, 16)  # vocab 64 / tensor 2, embed 32 / fsdp 2
    y0, _ = jax.jit(model.apply)(params, TOKENS)
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
    lines = [f"{sha256_file(cfg_path)}  config.json" if l.endswith("  config.json") else l for l in lines]
    open(os.path.join(path, CHECKSUMS), "w").write("\n".join(lines) + "\n")
    with pytest.raises(ReleaseError, match="do not fit the config"):
        mnemax.load_pretrained(path)


def test_refuses_to_overwrite(bundle):
    model, params, path = bundle
    with pytest.raises(ReleaseError, match="not empty"):
        mnemax.save_pretrained(path, model, params)
    mnemax.save_pretrained(path, model, params, overwrite=True)
    mnemax.load_pretrained(path)


# -- overwrite: only an earlier bundle or an empty directory is replaced -------------------


def _other_params(model, seed):
    return model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))


def test_overwrite_refuses_what_is_not_a_bundle(bundle, tmp_path):
    model, params, _ = bundle
    # A directory of someone's files.
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sentinel.txt").write_text("keep me")
    (mine / "sub" / "notes.md").write_text("and me")
    with pytest.raises(ReleaseError, match=re.escape(str(mine)) + ".*no config.json.*not a mnemax release bundle"):
        mnemax.save_pretrained(str(mine), model, params, overwrite=True)
    assert (mine / "sentinel.txt").read_text() == "keep me" and (mine / "sub" / "notes.md").read_text() == "and me"
    assert sorted(os.listdir(mine)) == ["sentinel.txt", "sub"]
    # A config.json of another format (e.g. a training workdir's, or a HF model's).
    (mine / "config.json").write_text(json.dumps({"format": "something-else", "d_model": 8}))
    with pytest.raises(ReleaseError, match=re.escape(str(mine)) + ".*format 'something-else'"):
        mnemax.save_pretrained(str(mine), model, params, overwrite=True)
    (mine / "config.json").write_text("{broken")
    with pytest.raises(ReleaseError, match=re.escape(str(mine)) + ".*config.json"):
        mnemax.save_pretrained(str(mine), model, params, overwrite=True)
    assert (mine / "sentinel.txt").read_text() == "keep me" and (mine / "config.json").read_text() == "{broken"
    # A file.
    afile = tmp_path / "a_file"
    afile.write_text("data")
    for overwrite in (False, True):
        with pytest.raises(ReleaseError, match=re.escape(str(afile)) + ".*not a directory"):
            mnemax.save_pretrained(str(afile), model, params, overwrite=overwrite)
    assert afile.read_text() == "data"


def test_overwrite_refuses_a_bundle_holding_other_files(bundle):
    model, params, path = bundle
    with open(os.path.join(path, "my_eval_results.csv"), "w") as f:
        f.write("acc,0.9\n")
    before = sorted(os.listdir(path))
    with pytest.raises(ReleaseError, match=re.escape(path) + ".*my_eval_results.csv"):
        mnemax.save_pretrained(path, model, params, overwrite=True)
    assert sorted(os.listdir(path)) == before
    assert open(os.path.join(path, "my_eval_results.csv")).read() == "acc,0.9\n"


def test_overwrite_replaces_a_bundle_or_an_empty_dir(bundle, tmp_path):
    model, params, path = bundle
    new = nn.meta.unbox(_other_params(model, 1))
    assert not np.allclose(new["params"]["embed"]["embedding"], params["params"]["embed"]["embedding"])
    with pytest.raises(ReleaseError, match=re.escape(path) + ".*not empty.*overwrite=True"):
        mnemax.save_pretrained(path, model, new)
    mnemax.save_pretrained(path, model, new, overwrite=True, extra={"note": "second"})
    assert sorted(os.listdir(path)) == ["README.md", CHECKSUMS, "config.json", "params"]
    _, loaded = mnemax.load_pretrained(path)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.load(open(os.path.join(path, "config.json")))["extra"] == {"note": "second"}
    empty = tmp_path / "empty"
    empty.mkdir()
    for overwrite in (False, True):
        mnemax.save_pretrained(str(empty), model, new, overwrite=overwrite)  # the first write fills it, the second replaces
    _, loaded = mnemax.load_pretrained(str(empty))
    np.testing.assert_array_equal(np.asarray(loaded["params"]["embed"]["embedding"]),
                                  np.asarray(new["params"]["embed"]["embedding"]))


# -- checksum entries stay inside the bundle; malformed files are named -----------------------


def _rewrite_checksums(path, edit):
    cks = os.path.join(path, CHECKSUMS)
    lines = open(cks).read().splitlines()
    lines = edit(lines)
    open(cks, "w").write("\n".join(lines) + "\n")
    return lines


@pytest.fixture()
def opened(monkeypatch):
    """Paths opened through builtins.open (how release.py reads files) during the test."""
    import builtins

    seen, real_open = [], builtins.open

    def spy(file, *args, **kwargs):
        seen.append(os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    return seen


@pytest.mark.parametrize("kind", ["dotdot", "nested_dotdot", "absolute"])
def test_checksum_entries_outside_the_bundle_are_refused(bundle, tmp_path, kind, opened):
    _, _, path = bundle
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the bundle")
    entry = {"dotdot": "../secret.txt", "nested_dotdot": "params/../../secret.txt", "absolute": str(secret)}[kind]
    assert os.path.abspath(os.path.join(path, entry)) == str(secret)
    lines = _rewrite_checksums(path, lambda ls: ls + [f"{'0' * 64}  {entry}"])  # nothing recomputed
    opened.clear()
    with pytest.raises(ReleaseError) as err:
        mnemax.load_pretrained(path)
    msg = str(err.value)
    assert f"{CHECKSUMS} in {path!r}, line {len(lines)}: entry {entry!r}" in msg, msg
    assert ("absolute" if kind == "absolute" else "leaves the bundle") in msg
    assert str(secret) not in opened, "the file named by the entry was read"
    assert not any(p == os.path.join(path, "README.md") for p in opened), "files were hashed before the entries were checked"


def test_symlink_leading_outside_is_refused(bundle, tmp_path):
    _, _, path = bundle
    readme = os.path.join(path, "README.md")
    outside = tmp_path / "outside_readme.md"
    outside.write_bytes(open(readme, "rb").read())  # same content: its checksum still matches
    os.remove(readme)
    os.symlink(outside, readme)
    assert sha256_file(readme) == sha256_file(str(outside))
    with pytest.raises(ReleaseError, match=r"README\.md is a symbolic link leading outside the bundle"):
        mnemax.load_pretrained(path)
    # A symlinked params/ directory pointing elsewhere is refused too, even unlisted.
    os.remove(readme)
    open(readme, "wb").write(outside.read_bytes())
    params_dir = os.path.join(path, "params")
    os.rename(params_dir, str(tmp_path / "params_elsewhere"))
    os.symlink(tmp_path / "params_elsewhere", params_dir)
    _rewrite_checksums(path, lambda ls: [l for l in ls if "  params/" not in l])
    with pytest.raises(ReleaseError, match="params is a symbolic link leading outside the bundle"):
        mnemax.load_pretrained(path)


def test_checksum_entries_must_equal_the_files(bundle):
    _, _, path = bundle
    extra_file = os.path.join(path, "params", "planted.bin")
    open(extra_file, "wb").write(b"x")
    with pytest.raises(ReleaseError, match=r"not covered by checksums\.sha256.*params/planted\.bin"):
        mnemax.load_pretrained(path)
    os.remove(extra_file)
    lines = _rewrite_checksums(path, lambda ls: ls + [ls[0]])
    with pytest.raises(ReleaseError, match=rf"line {len(lines)}: entry 'README.md' is listed twice \(first on line 1\)"):
        mnemax.load_pretrained(path)
    _rewrite_checksums(path, lambda ls: ls[:-1] + [f"{'a' * 64}  {CHECKSUMS}"])
    with pytest.raises(ReleaseError, match=rf"lists '{re.escape(CHECKSUMS)}'"):
        mnemax.load_pretrained(path)
    _rewrite_checksums(path, lambda ls: ls[:-1] + [f"{'a' * 64}  ./README.md"])
    with pytest.raises(ReleaseError, match=r"entry './README.md' is not a normalised relative path"):
        mnemax.load_pretrained(path)


@pytest.mark.parametrize("bad_line, why", [
    ("no-separator-here", "expected '<sha256 hex digest>  <relative path>'"),
    (f"{'0' * 63}  README.md", "is not a sha256 hex digest"),
    (f"{'g' * 64}  README.md", "is not a sha256 hex digest"),
    (f"{'0' * 64}  ", "empty path"),
])
def test_malformed_checksum_line(bundle, bad_line, why):
    _, _, path = bundle
    _rewrite_checksums(path, lambda ls: ls[:2] + [bad_line] + ls[2:])
    with pytest.raises(ReleaseError) as err:
        mnemax.load_pretrained(path)
    assert f"{CHECKSUMS} in {path!r}, line 3" in str(err.value), str(err.value)
    assert why in str(err.value)


def test_malformed_config_json(bundle):
    model, params, path = bundle
    cfg_path = os.path.join(path, "config.json")
    open(cfg_path, "w").write('{"format": "mnemax-release/1",\n  "family": oops}\n')
    # Not re-signed: the altered file is caught by its checksum first.
    with pytest.raises(ReleaseError, match="checksum mismatch for config.json"):
        mnemax.load_pretrained(path)
    # Re-signed: the JSON error, with its position.
    _rewrite_checksums(path, lambda ls: [f"{sha256_file(cfg_path)}  config.json" if l.endswith("  config.json") else l
                                         for l in ls])
    with pytest.raises(ReleaseError, match=r"config\.json in .* is not valid JSON: Expecting value at line 2 column 13"):
        mnemax.load_pretrained(path)
    open(cfg_path, "w").write("[1, 2]")
    _rewrite_checksums(path, lambda ls: [f"{sha256_file(cfg_path)}  config.json" if l.endswith("  config.json") else l
                                         for l in ls])
    with pytest.raises(ReleaseError, match=r"config\.json in .* must hold a JSON object, got list"):
        mnemax.load_pretrained(path)
