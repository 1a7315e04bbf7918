"""Converted PyPI ``xlstm`` 2.0.6 weights give upstream's logits, outputs and states
(fixtures written by tests/fixtures/make_xlstm_fixtures.py with torch on CPU): the
``xLSTMLMModel``, bare ``xLSTMBlockStack``s, ``xLSTMLarge`` at several sizes. The
full-size presets have upstream's parameter counts and shapes, every rounded width
equals upstream's over a sweep (all recorded there on torch's meta device), and
upstream's config defaults are the ones mnemax wrote down."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.convert import xlstm_config_from_torch, xlstm_from_torch, xlstm_stack_config_from_torch
from mnemax.convert.xlstm_config import UPSTREAM_DEFAULTS
from mnemax.layers import MLSTMLargeLayer, MLSTMLayer, SLSTMBlock, SLSTMLayer, XLSTMLargeBlock, XLSTMStack
from mnemax.layers.xlstm_widths import large_ffn_dim, up_proj_dim

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


# ----------------------------------------------------------------------------- bare block stacks


def close(got, want, tol=1e-4):
    """max |got - want| <= tol * max(1, max |want|)."""
    want = np.asarray(want, np.float64)
    return max_err(got, want) <= tol * max(1.0, float(np.abs(want).max()))


def assert_stack_state_matches(state, z, tag):
    """mnemax's XLSTMStack state against upstream's ``stack.step`` state: mLSTM (C, n, m) with
    upstream's keys scaled by 1/sqrt(d_head) (mnemax scales the queries instead, so its C and n
    are sqrt(d_head) times upstream's); sLSTM (h, c, n, m) stacked as (4, batch, features);
    the conv state holds the last W inputs upstream and the last W - 1 in mnemax."""
    for b, block in enumerate(state):
        key = f"{tag}/block_{b}"
        if f"{key}/mlstm_state/0" in z.files:
            C, n, m = (np.asarray(a, np.float64) for a in block.cell)
            scale = math.sqrt(C.shape[-2])
            assert close(C / scale, z[f"{key}/mlstm_state/0"]), (key, "C")
            assert close(n / scale, z[f"{key}/mlstm_state/1"][..., 0]), (key, "n")
            assert close(m, z[f"{key}/mlstm_state/2"][..., 0, 0]), (key, "m")
        else:
            want = z[f"{key}/slstm_state/0"]
            for j, leaf in enumerate(block.cell):  # h, c, n, m
                assert close(np.asarray(leaf).reshape(want.shape[1:]), want[j]), (key, "hcnm"[j])
        assert close(block.conv.inputs, z[f"{key}/conv_state/0"][:, 1:]), (key, "conv")


@pytest.mark.parametrize("name", ["xlstm_stack_slstm", "xlstm_stack_mlstm"])
def test_bare_block_stack_outputs_and_states_match_fixture(name):
    """A bare xLSTMBlockStack -> XLSTMStack: ``stack.apply(variables, x)`` equals upstream's
    ``stack(x)``; run in two pieces with the state carried, the first piece's state, the second
    piece's outputs and the final state equal upstream's ``stack.step`` token by token. The sLSTM
    stack (d = 40, slstm_at=[1], FFN rounded to 32) and the mLSTM-only stack (d = 96, up-projection
    rounded *down* to 32, 3 heads, qkv blocks of 8) use dims no other fixture uses."""
    z, cfg = load(name + ".npz")
    kwargs = json.loads(str(z["kwargs"]))
    sd = prefixed(z, "param/")
    x = jnp.asarray(z["x"])
    for config in (cfg, kwargs):  # dataclasses.asdict of the config, and the kwargs it was built from
        stack, variables = xlstm_from_torch(sd, config)
        assert isinstance(stack, XLSTMStack)
        assert count(variables) == int(z["param_count"])
        y, _ = stack.apply(variables, x)
        assert max_err(y, z["y"]) <= 1e-4
    split = int(z["split"])
    apply = jax.jit(stack.apply)
    y1, s1 = apply(variables, x[:, :split])
    assert max_err(y1, z["y"][:, :split]) <= 1e-4
    assert_stack_state_matches(s1, z, "state_first")
    y2, s2 = apply(variables, x[:, split:], s1)
    assert max_err(y2, z["y_steps_rest"]) <= 1e-4
    assert_stack_state_matches(s2, z, "state_last")
    # The unbound stack of the config alone is the same module.
    assert xlstm_stack_config_from_torch(kwargs) == stack


def test_stack_config_given_as_dataclasses():
    """The config as dataclass instances (stand-ins with upstream's class and field names),
    nested the way upstream nests them, converts like its dict."""
    z, cfg = load("xlstm_stack_slstm.npz")

    def as_dataclass(name, fields):
        items = [(k, object, dataclasses.field(default_factory=lambda v=v: v)) for k, v in fields.items()]
        return dataclasses.make_dataclass(name, items)()

    mlstm = as_dataclass("mLSTMLayerConfig", cfg["mlstm_block"]["mlstm"])
    top = as_dataclass("xLSTMBlockStackConfig", {
        **cfg, "mlstm_block": as_dataclass("mLSTMBlockConfig", {**cfg["mlstm_block"], "mlstm": mlstm})})
    assert dataclasses.is_dataclass(top.mlstm_block.mlstm)
    stack, variables = xlstm_from_torch(prefixed(z, "param/"), top)
    y, _ = stack.apply(variables, jnp.asarray(z["x"]))
    assert max_err(y, z["y"]) <= 1e-4


# ----------------------------------------------------------------------------- xLSTMLarge at other sizes


def large_dims():
    z = np.load(os.path.join(FIXTURES, "xlstm_large_dims.npz"))
    return z, [int(d) for d in z["dims"]]


def test_xlstm_large_other_dims_logits_match_fixture():
    """xLSTMLarge at d = 48 and 96 (where upstream's FFN rounding ((x + 63) // 64) 64 differs
    from ceil(x / 64) 64: 48 x 2.6667 = 128.0016 -> 128, not 192) and d = 80 (other qk/v/FFN
    factors), from asdict and from the bare kwargs (absent fields take upstream's defaults)."""
    z, dims = large_dims()
    assert dims == [48, 80, 96]
    for d in dims:
        cfg = json.loads(str(z[f"d{d}/config"]))
        sd = prefixed(z, f"d{d}/param/")
        kwargs = {k: cfg[k] for k in ("embedding_dim", "num_heads", "num_blocks", "vocab_size", "chunk_size",
                                      "qk_dim_factor", "v_dim_factor", "ffn_proj_factor",
                                      "ffn_round_up_to_multiple_of") if cfg[k] != UPSTREAM_DEFAULTS["xLSTMLargeConfig"].get(k)}
        for config in (cfg, kwargs):
            mcfg, variables = xlstm_from_torch(sd, config)
            logits, _ = mnemax.build(mcfg).apply(variables, jnp.asarray(z[f"d{d}/tokens"]))
            assert max_err(logits, z[f"d{d}/logits"]) <= 1e-4, d


def mnemax_large_shapes_as_upstream(params, fused: bool) -> dict:
    """mnemax xlstm_large parameter shapes under upstream's names and layouts (torch Linear
    weights are (out, in); flax kernels (in, out)), written from upstream's modules."""
    t = lambda s: [s[1], s[0]]  # noqa: E731
    out = {"embedding.weight": list(params["embed"]["embedding"].shape),
           "lm_head.weight": t(params["head"]["kernel"].shape)}
    if "final_norm" in params:
        out["backbone.out_norm.weight"] = list(params["final_norm"]["scale"].shape)
    for name, blk in params.items():
        if not name.startswith("block_"):
            continue
        pre = f"backbone.blocks.{name[6:]}."
        m, f = blk["mlstm"], blk["ffn"]
        shp = {k: m[k]["kernel"].shape for k in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact")}
        lay = pre + "mlstm_layer."
        if fused:
            out[lay + "qkv_opreact.weight"] = [sum(shp[k][1] for k in ("q", "k", "v", "ogate_preact")), shp["q"][0]]
            out[lay + "ifgate_preact.weight"] = [2 * shp["igate_preact"][1], shp["q"][0]]
            out[lay + "ifgate_preact.bias"] = [2 * m["igate_preact"]["bias"].shape[0]]
            out[pre + "ffn.proj_up_gate_z.weight"] = [2 * f["gate"]["kernel"].shape[1], f["gate"]["kernel"].shape[0]]
        else:
            for k in shp:
                out[lay + k + ".weight"] = t(shp[k])
            for k in ("igate_preact", "fgate_preact"):
                out[lay + k + ".bias"] = list(m[k]["bias"].shape)
            out[pre + "ffn.proj_up_gate.weight"] = t(f["gate"]["kernel"].shape)
            out[pre + "ffn.proj_up.weight"] = t(f["up"]["kernel"].shape)
        out[lay + "multihead_norm.weight"] = list(m["multihead_norm"].shape)
        out[lay + "out_proj.weight"] = t(m["out_proj"]["kernel"].shape)
        out[pre + "ffn.proj_down.weight"] = t(f["down"]["kernel"].shape)
        out[pre + "norm_mlstm.weight"] = list(blk["norm_mlstm"]["scale"].shape)
        out[pre + "norm_ffn.weight"] = list(blk["norm_ffn"]["scale"].shape)
    return out


def test_xlstm_large_param_shapes_equal_upstream():
    """Every parameter shape of xLSTMLarge at d = 48, 80, 96, 1000 (FFN factor 3.5), 2048 (fused
    weights) and 4096 (the 7B model, 32 blocks), built on torch's meta device, equals the mnemax
    model's (jax.eval_shape, nothing allocated); the xlstm-7b preset resized to d = 48 too."""
    shapes = json.load(open(os.path.join(FIXTURES, "xlstm_shapes.json")))
    assert {"d48", "d80", "d4096"} <= set(shapes) and len(shapes) >= 4
    for name, entry in shapes.items():
        cfg = entry["config"]
        mcfg = xlstm_config_from_torch(cfg)
        params = jax.eval_shape(mnemax.build(mcfg).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
        params = flax_unbox(params)
        assert mnemax_large_shapes_as_upstream(params, cfg["weight_mode"] == "fused") == entry["shapes"], name
    preset = mnemax.create("xlstm-7b", d_model=48, n_layers=1, vocab_size=37, num_heads=4, chunk_size=8)
    params = flax_unbox(jax.eval_shape(preset.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    assert mnemax_large_shapes_as_upstream(params, False) == shapes["d48"]["shapes"]
    params = flax_unbox(jax.eval_shape(mnemax.create("xlstm-7b").init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    assert mnemax_large_shapes_as_upstream(params, False) == shapes["d4096"]["shapes"]


def flax_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


# ----------------------------------------------------------------------------- rounded widths and defaults


def table(name):
    t = json.load(open(os.path.join(FIXTURES, "xlstm_widths.json")))[name]
    return [dict(zip(t["columns"], row)) for row in t["rows"]]


def test_rounded_widths_equal_upstream():
    """Over a sweep of embedding dims (8..512 and up to 8192), factors, multiples and rounding
    rules, the widths the mnemax layers compute equal the ones upstream's configs and modules
    hold: the mLSTM inner width and its qkv blocks, the sLSTM-block FFN, the 7B FFN and qk/v
    dims. The 7B FFN rows include ones where ceil(d f / m) m is wrong."""
    mlstm = table("mlstm_up_proj")
    assert len(mlstm) > 1000
    for r in mlstm:
        mode = "up" if r["up"] else "down"
        assert up_proj_dim(r["d"], r["proj_factor"], r["multiple"], mode) == r["inner"], r
        if r["proj_up"] is not None:  # upstream built the layer (qkv_proj_blocksize 4)
            layer = MLSTMLayer(features=r["d"], proj_factor=r["proj_factor"], round_to=r["multiple"], round_mode=mode,
                               qkv_blocksize=4, num_heads=1)
            blocks = layer.qkv_blocks
            assert [2 * layer.inner, r["d"]] == r["proj_up"], r
            assert [blocks, layer.inner // blocks, layer.inner // blocks] == r["q_proj"], r
    for r in table("slstm_ffn"):
        block = SLSTMBlock(slstm=SLSTMLayer(features=r["d"]), ffn_proj_factor=r["proj_factor"], ffn_round_to=r["multiple"],
                           ffn_round_mode="up" if r["up"] else "down")
        if r["hidden"] > 0:
            assert block.ffn_hidden == r["hidden"], r
        else:
            with pytest.raises(ValueError, match="ffn_round_to"):
                block.ffn_hidden
    large = table("large")
    differs = 0
    for r in large:
        if r["kind"] == "ffn":
            block = XLSTMLargeBlock(mlstm=MLSTMLargeLayer(features=r["d"]), ffn_proj_factor=r["ffn_proj_factor"],
                                    ffn_round_to=r["multiple"])
            assert block.ffn_hidden == r["hidden"], r
            differs += math.ceil(r["d"] * r["ffn_proj_factor"] / r["multiple"]) * r["multiple"] != r["hidden"]
        else:
            layer = MLSTMLargeLayer(features=r["d"], qk_dim_factor=r["qk_dim_factor"], v_dim_factor=r["v_dim_factor"])
            assert layer.dims == (r["qk_dim"], r["v_dim"]) and r["q_shape"] == [r["qk_dim"], r["d"]], r
    assert differs >= 10  # the rows the old ceil rule got wrong are in the table


def test_layers_build_the_rounded_widths():
    """The widths above are the parameter shapes the layers create (a few rows built with
    jax.eval_shape): an mLSTM rounded down, an sLSTM block's FFN rounded to 32, a 7B block."""
    x = jnp.zeros((1, 3, 48))
    shapes = lambda m: flax_unbox(jax.eval_shape(m.init, jax.random.key(0), x)["params"])  # noqa: E731
    p = shapes(MLSTMLayer(features=48, proj_factor=1.3, round_to=32, round_mode="down", num_heads=2, qkv_blocksize=8))
    assert p["proj_up"]["kernel"].shape == (48, 2 * up_proj_dim(48, 1.3, 32, "down")) == (48, 64)
    assert p["q_proj"]["kernel"].shape == (4, 8, 8)
    p = shapes(SLSTMBlock(slstm=SLSTMLayer(features=48, num_heads=2), ffn_proj_factor=1.3, ffn_round_to=32))
    assert p["ffn"]["proj_up"]["kernel"].shape == (48, 2 * 64)
    p = shapes(XLSTMLargeBlock(mlstm=MLSTMLargeLayer(features=48, num_heads=4)))
    assert p["ffn"]["gate"]["kernel"].shape == (48, large_ffn_dim(48, 2.6667, 64)) == (48, 128)


def test_upstream_defaults_written_down():
    """Every default mnemax fills in for an absent config field is upstream's (the fixture
    script read them off the dataclasses' fields)."""
    recorded = json.load(open(os.path.join(FIXTURES, "xlstm_defaults.json")))
    assert set(recorded) == set(UPSTREAM_DEFAULTS)
    for cls, fields in recorded.items():
        ours = UPSTREAM_DEFAULTS[cls]
        required = {k for k, v in fields.items() if v == "<required>"}
        assert set(ours) == set(fields) - required, cls
        for k, v in ours.items():
            if isinstance(fields[k], dict) and fields[k]:  # a nested sub-config: our table of its class
                assert v is UPSTREAM_DEFAULTS[{"mlstm": "mLSTMLayerConfig", "slstm": "sLSTMLayerConfig",
                                               "feedforward": "FeedForwardConfig"}[k]], (cls, k)
            else:
                assert json.loads(json.dumps(v)) == fields[k], (cls, k, v, fields[k])
    assert recorded["xLSTMLargeConfig"]["embedding_dim"] == "<required>"


# ----------------------------------------------------------------------------- bad configs


def test_bad_configs_name_the_field():
    z, cfg = load("xlstm_stack_slstm.npz")
    kw = json.loads(str(z["kwargs"]))
    sd = prefixed(z, "param/")
    zl, dims = large_dims()
    large = json.loads(str(zl["d48/config"]))
    lsd = prefixed(zl, "d48/param/")

    def bad(config, match, state_dict=None, exc=ValueError):
        with pytest.raises(exc, match=match):
            if state_dict is None:
                xlstm_config_from_torch(config) if "vocab_size" in config or "num_heads" in config \
                    else xlstm_stack_config_from_torch(config)
            else:
                xlstm_from_torch(state_dict, config)

    # unknown storage layouts
    bad({**large, "weight_mode": "packed"}, r"config\.weight_mode must be one of \['single', 'fused'\]")
    slstm = {**kw["slstm_block"], "slstm": {**kw["slstm_block"]["slstm"], "backend": "triton"}}
    bad({**kw, "slstm_block": slstm}, r"config\.slstm_block\.slstm\.backend must be one of \['vanilla', 'cuda'\]")
    # inconsistent heads
    bad({**large, "num_heads": 5}, r"config\.num_heads \(5\) must divide the qk width .* = 24")
    bad({**large, "num_heads": 5}, r"config\.num_heads", lsd)
    mlstm = {"mlstm": {**kw["mlstm_block"]["mlstm"], "num_heads": 5}}
    bad({**kw, "mlstm_block": mlstm}, r"config\.mlstm_block\.mlstm\.num_heads \(5\) must divide the inner width 128")
    slstm = {**kw["slstm_block"], "slstm": {**kw["slstm_block"]["slstm"], "num_heads": 3}}
    bad({**kw, "slstm_block": slstm}, r"config\.slstm_block\.slstm\.num_heads \(3\) must divide embedding_dim \(40\)")
    mlstm = {"mlstm": {**kw["mlstm_block"]["mlstm"], "qkv_proj_blocksize": 3}}
    bad({**kw, "mlstm_block": mlstm}, r"config\.mlstm_block\.mlstm\.qkv_proj_blocksize \(3\) must split the inner width 128")
    # other fields
    bad({**kw, "slstm_at": [3]}, r"config\.slstm_at indices must lie in \[0, num_blocks=3\)")
    bad({**kw, "slstm_block": None}, r"config\.slstm_at places sLSTM blocks at \[1\] but config\.slstm_block is None")
    bad({**kw, "embedding_dim": 0}, r"config\.embedding_dim must be a positive integer, got 0")
    mlstm = {"mlstm": {**kw["mlstm_block"]["mlstm"], "num_head": 4}}
    bad({**kw, "mlstm_block": mlstm}, r"config\.mlstm_block\.mlstm has fields upstream's config does not have: \['num_head'\]")
    bad({k: v for k, v in large.items() if k != "vocab_size"}, r"needs \['vocab_size'\]")
    bad({**large, "slstm_at": [1]}, r"config mixes fields of xLSTMLargeConfig")
    bad({"embedding_dim": 8}, r"config is neither an xLSTMLargeConfig")
    bad({**cfg, "_block_map": None, "mlstm_block": {"mlstm": {**cfg["mlstm_block"]["mlstm"], "_inner_embedding_dim": 64}}},
        r"config\.mlstm_block\.mlstm\._inner_embedding_dim is 64, but upstream's rule gives 128")
    bad("xlstm", r"config must be an xlstm config dataclass", exc=TypeError)
    # the state_dict and the config disagree, or hold entries nothing explains
    bad(cfg, r"state_dict is not an xLSTMLMModel's", {"w": np.zeros(3)})
    bad(large, r"state_dict has no 'backbone\.\*' entries", sd)
    bad(cfg, r"state_dict has entries this config does not explain: \['blocks\.9\.extra'\]", {**sd, "blocks.9.extra": np.zeros(2)})
    bad({**cfg, "num_blocks": 2, "slstm_at": [1]}, r"state_dict has entries this config does not explain", sd)
