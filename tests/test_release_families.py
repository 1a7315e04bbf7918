"""A release round trip for every registered family's tiny preset, in float32 and bfloat16.

The families and their tiny presets are enumerated from the registry when the tests are
collected, so a newly registered family is covered (or reported, if it has no tiny preset)
without editing this file (a family without one fails, naming it). For each: build, init
with a fixed key, ``save_pretrained``, ``load_pretrained``; the bundle stores every leaf in its
own dtype (orbax's metadata), the loaded parameters equal the saved ones leaf by leaf, bit for
bit and with the same dtypes, the loaded config equals the original, and the loaded model's
outputs and returned state equal the original's bit for bit on the same inputs. The bfloat16
case builds the family with ``param_dtype="bfloat16"`` (the saved leaves are the float32 init
rounded to the dtypes that config declares): the bundle must keep those bfloat16 values exactly.

Cost: one compiled init and one compiled apply (both dtypes) per family, XLA at -O0 (only
the bits of one executable are compared), short sequences.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.release import abstract_params

# Only the bits are compared, and the original and the loaded model run through the same
# executable: compile it as cheaply as XLA allows.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BATCH, TIME = 2, 6  # crosses hcam-tiny's 4-step chunk boundary


def _tiny_presets_by_family() -> dict[str, list[str]]:
    out = {f: [] for f in mnemax.list_families()}
    for name in mnemax.list_models():
        if name.endswith("-tiny"):
            out[mnemax.get_config(name).family].append(name)
    return out


TINY = _tiny_presets_by_family()
FAMILIES = sorted(TINY)


def _preset_of(family: str) -> str:
    """The family's tiny preset: ``<family>-tiny`` if registered, else its first ``*-tiny``."""
    names = TINY[family]
    if not names:
        pytest.fail(
            f"family {family!r} has no tiny preset (no registered '*-tiny' preset of family {family!r}; "
            f"its presets: {sorted(m for m in mnemax.list_models() if mnemax.get_config(m).family == family)}). "
            f"Register one (e.g. '{family}-tiny') so that its release round trip is tested here."
        )
    return f"{family}-tiny" if f"{family}-tiny" in names else names[0]


def _inputs(cfg):
    rng = np.random.default_rng(1)
    if cfg.vocab_size is not None:
        return jnp.asarray(rng.integers(0, cfg.vocab_size, (BATCH, TIME)), jnp.int32)
    return jnp.asarray(rng.normal(size=(BATCH, TIME, cfg.input_dim)), jnp.float32)


# Both models' ``apply`` (float32 and bfloat16 parameters) in one executable per family: the
# loaded models, if equal to the originals (same configs), reuse it, so equal parameters must
# give equal bits; models that differ get their own.
_APPLY = jax.jit(lambda m32, m16, p32, p16, x: (m32.apply(p32, x), m16.apply(p16, x)), static_argnums=(0, 1),
                 compiler_options=FAST)
_INIT = jax.jit(lambda m, k, x: nn.meta.unbox(m.init(k, x)), static_argnums=0, compiler_options=FAST)
ON_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # where load_pretrained restores to


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of an array (NaN payloads and signed zeros included)."""
    a = np.ascontiguousarray(a)
    if a.dtype == bool:
        return a.view(np.uint8)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_trees_bitwise_equal(got, want, what: str) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want), f"{what}: tree structures differ"
    g = jax.tree_util.tree_leaves_with_path(got)
    w = jax.tree_util.tree_leaves_with_path(want)
    assert len(g) == len(w) and len(w) > 0, f"{what}: {len(g)} vs {len(w)} leaves"
    for (path, a), (_, b) in zip(g, w):
        name = f"{what}{jax.tree_util.keystr(path)}"
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"{name} (bits)")


def _cast_to(params, abstract):
    """``params`` (float32 init) rounded to the dtypes ``abstract`` declares, leaf by leaf (numpy's
    round-to-nearest-even, as XLA's convert)."""
    return jax.tree.map(lambda p, a: np.asarray(p).astype(a.dtype), params, abstract)


def stored_dtypes(path: str) -> dict:
    """``{leaf path: dtype}`` of the parameters as the bundle stores them (orbax's metadata)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(os.path.join(path, "params"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {jax.tree_util.keystr(k): np.dtype(v.dtype) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _save_and_load(model, params, path):
    """The loaded (model, params) of a bundle of ``params``, checked: stored in their own dtypes,
    the same config, the same parameters bit for bit."""
    mnemax.save_pretrained(path, model, params)
    want_dtypes = {jax.tree_util.keystr(k): np.dtype(v.dtype) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    assert stored_dtypes(path) == want_dtypes, "the bundle does not store the parameters in their own dtypes"
    loaded_model, loaded = mnemax.load_pretrained(path)
    assert loaded_model.config == model.config
    assert_trees_bitwise_equal(loaded, params, "params")
    return loaded_model, loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_release_round_trip_is_bitwise(family, tmp_path):
    preset = _preset_of(family)
    cfg = mnemax.get_config(preset)
    model = mnemax.build(cfg)
    x = _inputs(cfg)
    params = jax.device_put(_INIT(model, jax.random.key(7), x), ON_DEVICE)
    assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"float32"}, preset

    # bfloat16 parameters: the same family with param_dtype=bfloat16, the init rounded to it
    model16 = mnemax.build(cfg.replace(param_dtype="bfloat16"))
    declared = nn.meta.unbox(abstract_params(model16))
    assert {str(a.dtype) for a in jax.tree.leaves(declared)} == {"bfloat16"}, f"{preset}: param_dtype=bfloat16 ignored"
    params16 = jax.device_put(_cast_to(params, declared), ON_DEVICE)
    rounded = sum(int(np.any(np.asarray(a, np.float32) != np.asarray(b))) for a, b in
                  zip(jax.tree.leaves(params16), jax.tree.leaves(params)))
    assert rounded > 0, f"{preset}: casting to bfloat16 changed nothing, so the test could not tell the dtypes apart"

    want = _APPLY(model, model16, params, params16, x)
    loaded_model, loaded = _save_and_load(model, params, str(tmp_path / "f32"))
    loaded_model16, loaded16 = _save_and_load(model16, params16, str(tmp_path / "bf16"))
    assert {str(a.dtype) for a in jax.tree.leaves(loaded16)} == {"bfloat16"}
    with open(os.path.join(str(tmp_path / "bf16"), "config.json")) as f:
        assert json.load(f)["config"]["param_dtype"] == "bfloat16"
    got = _APPLY(loaded_model, loaded_model16, loaded, loaded16, x)
    for i, dtype in enumerate(("float32", "bfloat16")):
        assert_trees_bitwise_equal(got[i][0], want[i][0], f"outputs ({dtype} params)")
        assert_trees_bitwise_equal(got[i][1], want[i][1], f"state ({dtype} params)")

    y32, y16 = np.asarray(want[0][0]), np.asarray(want[1][0], np.float32)
    assert y32.shape[:2] == (BATCH, TIME) and np.isfinite(y32).all() and np.isfinite(y16).all(), preset
    assert not np.array_equal(y32[0], y32[1]), f"{preset}: both rows gave the same outputs (inputs ignored?)"
    assert not np.array_equal(y32, y16), f"{preset}: bfloat16 parameters gave the float32 outputs"


def test_every_family_is_enumerated():
    """The parametrisation above is the registry's family list (nothing hard-coded)."""
    assert FAMILIES == mnemax.list_families() and len(FAMILIES) >= 9


@pytest.mark.parametrize("cast", ["bfloat16", "float16"])
def test_params_in_another_dtype_than_the_config_are_refused(tmp_path, cast):
    """Parameters cast away from the dtypes the config builds would come back cast to the
    config's on load (orbax restores to the target dtype): ``save_pretrained`` refuses them,
    naming a leaf and both dtypes, and writes nothing."""
    model = mnemax.create("transformer-tiny")
    x = _inputs(model.config)
    params = jax.tree.map(lambda a: np.asarray(a).astype(cast), _INIT(model, jax.random.key(7), x))
    with pytest.raises(mnemax.release.ReleaseError, match=rf"wrong dtypes .*\['attn'\]\['key'\]\['kernel'\]: {cast} vs config float32.*\(21 leaves"):
        mnemax.save_pretrained(str(tmp_path / "b"), model, params)
    assert not os.path.exists(tmp_path / "b" / "params")
