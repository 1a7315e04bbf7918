"""The families' typed configs and the registry: block options derived from the config
dataclasses (the keywords ``create`` takes), validation that names the field, the family
resolved once by ``build``, and the kernel sharding handed to every block's mixer (a
Pallas scan under a mesh of other axis names runs per shard and equals the unsharded
model; without the sharding it refuses to run replicated)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax import registry
from mnemax.config import BlockConfig
from mnemax.kernels.sharding import KernelSharding
from mnemax.model import with_kernel_sharding


def _tokens(cfg, shape=(4, 8), seed=0):
    rng = np.random.default_rng(seed)
    if cfg.vocab_size is not None:
        return jnp.asarray(rng.integers(0, cfg.vocab_size, shape), jnp.int32)
    return jnp.asarray(rng.normal(size=shape + (cfg.input_dim,)), jnp.float32)


def test_every_family_has_a_typed_config_and_a_tiny_preset():
    for name in mnemax.list_families():
        family = mnemax.get_family(name)
        assert issubclass(family.config, BlockConfig) and dataclasses.is_dataclass(family.config)
        assert family.config.__dataclass_params__.frozen
        # block_keys is the config class's fields with their defaults, not a table of its own
        assert family.block_keys == {f.name: f.default for f in dataclasses.fields(family.config)}
        tiny = mnemax.tiny_preset(name)
        assert tiny in mnemax.list_models(family=name) and mnemax.get_config(tiny).family == name
        assert all(mnemax.get_config(p).family == name for p in mnemax.list_models(family=name))
    assert sorted(p for f in mnemax.list_families() for p in mnemax.list_models(family=f)) == mnemax.list_models()


def test_block_options_are_the_config_fields_and_overrides_reach_them():
    cfg = mnemax.get_config("mamba-tiny", d_state=4, dt_rank=2, d_model=24)
    assert isinstance(cfg.block, mnemax.families.MambaConfig)
    assert (cfg.block.d_state, cfg.block["dt_rank"], cfg.d_model) == (4, 2, 24)
    assert dict(cfg.block) == {f.name: getattr(cfg.block, f.name) for f in dataclasses.fields(cfg.block)}
    # an option the preset does not set is the config class's default
    assert cfg.block.dt_init == mnemax.families.MambaConfig.defaults()["dt_init"] == "random"
    # the override reaches the layers: x_proj is (E, R + 2N), dt_proj (R, E)
    params = jax.eval_shape(mnemax.build(cfg).init, jax.random.key(0), _tokens(cfg, (1, 3)))["params"]
    mixer = nn.meta.unbox(params["block_0"]["mixer"])
    assert mixer["x_proj"]["kernel"].shape == (48, 2 + 2 * 4) and mixer["dt_proj"]["kernel"].shape == (2, 48)
    # replace on the config: same rules, and a family change re-reads the block
    again = cfg.replace(d_state=6, n_layers=3)
    assert again.block.d_state == 6 and again.n_layers == 3 and again.block.dt_rank == 2
    mm = cfg.replace(family="memmamba", pool_size=5)
    assert isinstance(mm.block, mnemax.families.MemMambaConfig) and mm.block.d_state == 4 and mm.block.pool_size == 5


@pytest.mark.parametrize("preset,option,value,message", [
    ("mamba-tiny", "d_state", 0, r"d_state must be an integer >= 1, got 0 \(MambaConfig\)"),
    ("mamba-tiny", "dt_init", "uniform", r"dt_init must be one of \('random', 'constant'\), got 'uniform'"),
    ("transformer-tiny", "norm", "batch", r"norm must be 'rms' or 'layer', got 'batch'"),
    ("memmamba-tiny", "pool_dim", 15, r"pool_dim must be divisible by num_heads \(2\), got 15"),
    ("hcam-tiny", "top_k", 9, r"top_k must be <= num_chunks \(8\), got 9"),
    ("xlstm-tiny", "slstm_at", "some", r"slstm_at must be a tuple of block indices or 'all', got 'some'"),
    ("elm-tiny", "routing", "hashed", r"routing must be one of \(None, 'random', 'structured'\), got 'hashed'"),
    ("s4d-tiny", "dt_max", 1e-4, r"dt_max must be >= dt_min \(0\.01\), got 0\.0001"),
])
def test_a_bad_option_is_named(preset, option, value, message):
    with pytest.raises(ValueError, match=message):
        mnemax.create(preset, **{option: value})


def test_a_plain_block_mapping_is_converted_and_checked():
    cfg = mnemax.ModelConfig(family="s4d", d_model=8, n_layers=1, vocab_size=4, block={"state_size": 4})
    assert cfg.block == mnemax.families.S4DConfig(state_size=4) and hash(cfg) == hash(cfg.replace())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['stat_size'\] for family 's4d'"):
        mnemax.ModelConfig(family="s4d", d_model=8, n_layers=1, vocab_size=4, block={"stat_size": 4})
    with pytest.raises(TypeError, match="block must be a S4DConfig for family 's4d', got MambaConfig"):
        mnemax.ModelConfig(family="s4d", d_model=8, n_layers=1, vocab_size=4, block=mnemax.families.MambaConfig())
    with pytest.raises(ValueError, match=r"family must be one of \[.*'transformer'.*\], got 'gpt'"):
        mnemax.ModelConfig(family="gpt", d_model=8, n_layers=1, vocab_size=4)


def test_build_resolves_the_family_once(monkeypatch):
    """After build, running the model never looks the family up (the model holds it)."""
    cfg = mnemax.get_config("mamba-tiny")
    model = mnemax.build(cfg)
    assert model.family is mnemax.get_family("mamba")
    tok = _tokens(cfg, (2, 5))
    variables = model.init(jax.random.key(0), tok)
    want, _ = model.apply(variables, tok)

    def no_lookup(name):
        raise AssertionError(f"get_family({name!r}) called after build")

    monkeypatch.setattr(registry, "get_family", no_lookup)
    monkeypatch.setattr(mnemax.model, "get_family", no_lookup)
    got, _ = model.apply(variables, tok)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert model.initial_state(2).blocks[0].ssm.shape == (2, 64, 8)


def test_kernel_sharding_reaches_every_mixer_and_is_not_saved():
    ks = KernelSharding(batch=("rows",), heads="cols")
    with_field = []
    cases = [(f, mnemax.get_config(mnemax.tiny_preset(f))) for f in mnemax.list_families()]
    cases.append(("elm", mnemax.get_config("elm-tiny", neuron_model=False, n_layers=2)))  # a stack of ELM blocks
    for name, cfg in cases:
        model = mnemax.build(cfg, kernel_sharding=ks)
        assert model.kernel_sharding == ks and "kernel_sharding" not in cfg.to_dict()
        if hasattr(model, "block_template"):
            for i in range(cfg.n_layers):
                block = model.block_template(i)
                subs = [getattr(block, f.name) for f in dataclasses.fields(block) if isinstance(getattr(block, f.name), nn.Module)]
                for sub in subs:
                    if "kernel_sharding" in {f.name for f in dataclasses.fields(sub)}:
                        assert sub.kernel_sharding == ks, (name, i)
                        with_field.append(name)
        else:  # the single-neuron model
            assert model._neuron(parent=None).kernel_sharding == ks
            with_field.append(name)
    # the families whose mixers call a Pallas op with a kernel_sharding field
    assert {"mamba", "memmamba", "s4d", "elm"} <= set(with_field)
    block = mnemax.build(mnemax.get_config("mamba-tiny")).block_template(0)
    assert with_kernel_sharding(block, None) is block
    with pytest.raises(TypeError, match="kernel_sharding must be a mnemax.kernels.sharding.KernelSharding"):
        mnemax.create("mamba-tiny", kernel_sharding=("rows",))


def test_a_model_with_kernel_sharding_runs_per_shard_under_a_mesh_of_other_axis_names(monkeypatch):
    """mamba-tiny on the Pallas selective scan (interpreted on CPU) under a (4, 2) mesh named
    rows / cols: with the kernel sharding its logits equal the unsharded reference scan's;
    without it the kernel refuses to run replicated."""
    monkeypatch.setenv("MNEMAX_PALLAS_INTERPRET", "1")
    cfg = mnemax.get_config("mamba-tiny", n_layers=1, backend="pallas_tpu")
    tok = _tokens(cfg, (4, 6))
    reference = mnemax.build(cfg.replace(backend="reference"))
    variables = jax.jit(reference.init)(jax.random.key(0), tok)
    want, _ = jax.jit(reference.apply)(variables, tok)
    mesh = jax.make_mesh((4, 2), ("rows", "cols"))
    sharded = mnemax.build(cfg, kernel_sharding=KernelSharding(batch=("rows",), heads="cols"))
    with jax.set_mesh(mesh):
        got, _ = jax.jit(sharded.apply)(variables, tok)
        with pytest.raises(ValueError, match="would run replicated"):
            jax.jit(mnemax.build(cfg).apply)(variables, tok)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# A family's config restates the options of the layers its block holds (the typed config is
# what a preset, an override and a release bundle name); where both give a default, they
# must agree, except where the family means another default on purpose.
INTENDED_DEFAULTS = {
    ("elm", "num_memory"): "None: one memory unit per model feature (d_model), resolved when the block is built",
    ("hopfield", "num_heads"): "the causal Hopfield block's 4 heads; the bare layer keeps the paper's 1",
}


def _held_modules(module, seen=None):
    """``module`` and every module held in its fields, depth first."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield module
    for f in dataclasses.fields(module):
        value = getattr(module, f.name, None) if f.name not in ("parent", "name") else None
        if isinstance(value, nn.Module):
            yield from _held_modules(value, seen)


def test_family_config_defaults_agree_with_their_layers():
    checked = 0
    for fam in mnemax.list_families():
        family = registry.get_family(fam)
        cfg_defaults = {f.name: f.default for f in dataclasses.fields(family.config) if f.default is not dataclasses.MISSING}
        block = family.make_block(mnemax.get_config(mnemax.tiny_preset(fam)), 0)
        for module in _held_modules(block):
            for f in dataclasses.fields(type(module)):
                if f.name not in cfg_defaults or f.default is dataclasses.MISSING or (fam, f.name) in INTENDED_DEFAULTS:
                    continue
                checked += 1
                assert cfg_defaults[f.name] == f.default, (
                    f"{fam}: {family.config.__name__}.{f.name} defaults to {cfg_defaults[f.name]!r}, "
                    f"{type(module).__name__}.{f.name} to {f.default!r}")
    assert checked > 50, checked  # the walk reaches the mixers inside the blocks
