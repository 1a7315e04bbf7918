"""Converters from official PyTorch checkpoints to mnemax params (Mamba via HF
``transformers``; xLSTM via PyPI ``xlstm`` 2.0.6).

Each converter takes a ``state_dict`` (a mapping of names to arrays: numpy arrays,
torch tensors or anything ``numpy.asarray`` reads; torch is never imported here) and
the checkpoint's config, and returns ``(ModelConfig, params)`` with
``params = {"params": ...}`` ready for ``mnemax.build(config).apply``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def _to_numpy(value) -> np.ndarray:
    """A float32 numpy copy of an array-like (torch tensors via ``.detach().cpu()``)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if "bfloat16" in str(value.dtype) or "float16" in str(value.dtype):
            value = value.float()
        value = value.numpy()
    return np.asarray(value, np.float32)


def _cfg_get(cfg, key: str, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


# ----------------------------------------------------------------------------- Mamba (HF transformers)

_MAMBA_LAYER_KEYS = ("norm.weight", "mixer.A_log", "mixer.D", "mixer.conv1d.weight", "mixer.in_proj.weight",
                     "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias", "mixer.out_proj.weight")


def mamba_config_from_transformers(hf_config) -> ModelConfig:
    """The mnemax ``ModelConfig`` of an HF ``MambaConfig`` (object or its ``to_dict()``)."""
    get = lambda k, d=None: _cfg_get(hf_config, k, d)  # noqa: E731
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hf_config.hidden_act must be 'silu' (Mamba's activation), got {act!r}")
    d_model = int(get("hidden_size"))
    expand = get("expand", 2)
    inner = get("intermediate_size", None)
    if inner is not None and int(inner) != int(expand * d_model):
        raise ValueError(f"hf_config.intermediate_size must be expand * hidden_size = {int(expand * d_model)}, got {inner}")
    rank = get("time_step_rank", "auto")
    rank = math.ceil(d_model / 16) if rank == "auto" else int(rank)
    eps = float(get("layer_norm_epsilon", 1e-5))
    return ModelConfig(
        family="mamba",
        d_model=d_model,
        n_layers=int(get("num_hidden_layers")),
        vocab_size=int(get("vocab_size")),
        tie_embeddings=bool(get("tie_word_embeddings", True)),
        final_norm="rms",
        norm_eps=eps,
        block={
            **_mamba_block_defaults(),
            "d_state": int(get("state_size", 16)),
            "d_conv": int(get("conv_kernel", 4)),
            "expand": expand,
            "dt_rank": rank,
            "dt_min": float(get("time_step_min", 1e-3)),
            "dt_max": float(get("time_step_max", 1e-1)),
            "dt_init": get("time_step_init_scheme", "random"),
            "dt_scale": float(get("time_step_scale", 1.0)),
            "dt_init_floor": float(get("time_step_floor", 1e-4)),
            "conv_bias": bool(get("use_conv_bias", True)),
            "use_bias": bool(get("use_bias", False)),
            "norm_eps": eps,
            "residual_in_fp32": bool(get("residual_in_fp32", True)),
            "rescale_prenorm_residual": bool(get("rescale_prenorm_residual", False)),
        },
    )


def _mamba_block_defaults() -> dict:
    from .registry import get_family

    return dict(get_family("mamba").block_keys)


def mamba_from_transformers(state_dict: Mapping[str, Any], hf_config) -> tuple[ModelConfig, dict]:
    """Converts HF ``transformers`` Mamba weights (``MambaForCausalLM`` with ``backbone.``
    prefixes and ``lm_head``, or a bare ``MambaModel``; ``embedding``/``embeddings``) to
    a ``mamba`` ``ModelConfig`` and its params. A ``MambaModel`` has no head: its LM
    head is the tied embedding.

    Layout: in_proj (2E, d) -> kernel (d, 2, E) [x rows first, then z]; conv1d (E, 1, W)
    -> kernel (W, E); x_proj, dt_proj, out_proj, lm_head transposed; dt_proj.bias ->
    ``dt_bias``; norms' ``weight`` -> ``scale``.
    """
    sd = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
    if "embedding.weight" in sd and "embeddings.weight" not in sd:
        sd["embeddings.weight"] = sd.pop("embedding.weight")
    config = mamba_config_from_transformers(hf_config)
    if "lm_head.weight" not in sd and not config.tie_embeddings:
        raise ValueError("state_dict has no lm_head.weight but hf_config.tie_word_embeddings is False")

    used = set()

    def take(key):
        if key not in sd:
            raise ValueError(f"state_dict is missing {key!r} (have e.g. {sorted(sd)[:6]})")
        used.add(key)
        return _to_numpy(sd[key])

    E = int(config.block["expand"] * config.d_model)
    params: dict[str, Any] = {"embed": {"embedding": take("embeddings.weight")}}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        w_in = take(p + "mixer.in_proj.weight")
        mixer = {
            "in_proj": {"kernel": w_in.T.reshape(config.d_model, 2, E)},
            "conv1d": {"kernel": take(p + "mixer.conv1d.weight")[:, 0, :].T},
            "x_proj": {"kernel": take(p + "mixer.x_proj.weight").T},
            "dt_proj": {"kernel": take(p + "mixer.dt_proj.weight").T},
            "dt_bias": take(p + "mixer.dt_proj.bias"),
            "A_log": take(p + "mixer.A_log"),
            "D": take(p + "mixer.D"),
            "out_proj": {"kernel": take(p + "mixer.out_proj.weight").T},
        }
        if config.block["conv_bias"]:
            mixer["conv1d"]["bias"] = take(p + "mixer.conv1d.bias")
        if config.block["use_bias"]:
            mixer["in_proj"]["bias"] = take(p + "mixer.in_proj.bias").reshape(2, E)
            mixer["out_proj"]["bias"] = take(p + "mixer.out_proj.bias")
        params[f"block_{i}"] = {"norm": {"scale": take(p + "norm.weight")}, "mixer": mixer}
    params["final_norm"] = {"scale": take("norm_f.weight")}
    if not config.tie_embeddings:
        params["head"] = {"kernel": take("lm_head.weight").T}
    elif "lm_head.weight" in sd:
        used.add("lm_head.weight")  # tied: the same matrix as the embedding
    leftover = sorted(set(sd) - used)
    if leftover:
        raise ValueError(f"state_dict has keys this converter does not map: {leftover[:8]}")
    _check_against_model(config, params)
    return config, {"params": jax.tree.map(jnp.asarray, params)}


def _check_against_model(config: ModelConfig, params: dict) -> None:
    """The converted tree must have exactly the structure and shapes of ``build(config)``'s."""
    from flax import linen as nn

    from .registry import build

    want = jax.eval_shape(build(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    want = nn.meta.unbox(want)
    flat_want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(want)}
    flat_got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if flat_want != flat_got:
        diff = sorted(set(flat_want.items()) ^ set(flat_got.items()))
        raise ValueError(f"converted params do not match the model's for this config; differences: {diff[:6]}")


# ----------------------------------------------------------------------------- xLSTM (PyPI xlstm 2.0.6)


def _as_dict(config) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise ValueError(f"config must be an xlstm config dataclass or its dict, got {type(config).__name__}")


def _is_large(cfg: Mapping[str, Any]) -> bool:
    return "qk_dim_factor" in cfg


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"config: {what} is not supported by the mnemax xLSTM layers")


def xlstm_config_from_torch(config) -> ModelConfig:
    """The mnemax :class:`ModelConfig` of a PyPI ``xlstm`` 2.0.6 model config.

    ``config`` is an ``xLSTMLMModelConfig`` (NeurIPS block stack) or an
    ``xLSTMLargeConfig`` (7B layout), or ``dataclasses.asdict`` of one.
    """
    cfg = _as_dict(config)
    if _is_large(cfg):
        _require(not cfg.get("use_bias", False), "use_bias=True")
        _require(cfg.get("weight_mode", "single") in ("single", "fused"), f"weight_mode={cfg.get('weight_mode')!r}")
        return ModelConfig(
            family="xlstm_large",
            d_model=cfg["embedding_dim"],
            n_layers=cfg["num_blocks"],
            vocab_size=cfg["vocab_size"],
            final_norm="rms" if cfg.get("add_out_norm", True) else "none",
            norm_eps=cfg.get("norm_eps", 1e-6),
            logit_soft_cap=cfg.get("output_logit_soft_cap"),
            block={
                "num_heads": cfg["num_heads"],
                "qk_dim_factor": cfg.get("qk_dim_factor", 0.5),
                "v_dim_factor": cfg.get("v_dim_factor", 1.0),
                "gate_soft_cap": cfg.get("gate_soft_cap"),
                "ffn_proj_factor": cfg.get("ffn_proj_factor", 2.6667),
                "ffn_round_to": cfg.get("ffn_round_up_to_multiple_of", 64),
                "chunk_size": cfg.get("chunk_size", 64),
                "eps": cfg.get("eps", 1e-6),
                "norm_eps": cfg.get("norm_eps", 1e-6),
            },
        )
    if "mlstm_block" not in cfg and "slstm_block" not in cfg:
        raise ValueError(f"config is neither an xLSTMLMModelConfig nor an xLSTMLargeConfig: keys {sorted(cfg)}")
    _require(not cfg.get("bias", False), "bias=True")
    n = cfg["num_blocks"]
    slstm_at = cfg.get("slstm_at") or []
    block: dict[str, Any] = {"slstm_at": "all" if slstm_at == "all" else tuple(int(i) for i in slstm_at)}
    if cfg.get("mlstm_block") is None:
        block["slstm_at"] = "all"
    else:
        m = cfg["mlstm_block"]["mlstm"]
        _require(m.get("round_proj_up_dim_up", True) and m.get("round_proj_up_to_multiple_of", 64) == 64,
                 "an mLSTM up-projection not rounded up to a multiple of 64")
        block.update(
            num_heads=m["num_heads"], proj_factor=m["proj_factor"], conv_width=m["conv1d_kernel_size"],
            qkv_blocksize=m["qkv_proj_blocksize"],
        )
    if cfg.get("slstm_block") is not None:
        s = cfg["slstm_block"]["slstm"]
        _require(s.get("function", "slstm") == "slstm", f"sLSTM function {s.get('function')!r}")
        _require(s.get("backend", "vanilla") in ("vanilla", "cuda"), f"sLSTM backend {s.get('backend')!r}")
        block.update(
            slstm_heads=s["num_heads"], slstm_conv_width=s["conv1d_kernel_size"],
            slstm_bias_init=s.get("bias_init", "powerlaw_blockdependent"),
        )
        ff = cfg["slstm_block"].get("feedforward")
        if ff is None:
            block["ffn_proj_factor"] = None
        else:
            _require(not ff.get("bias", False), "a feed-forward bias")
            _require(ff.get("round_proj_up_dim_up", True) and ff.get("round_proj_up_to_multiple_of", 64) == 64,
                     "a feed-forward width not rounded up to a multiple of 64")
            block.update(ffn_proj_factor=ff["proj_factor"], ffn_act=ff["act_fn"])
    return ModelConfig(
        family="xlstm",
        d_model=cfg["embedding_dim"],
        n_layers=n,
        vocab_size=cfg["vocab_size"],
        tie_embeddings=bool(cfg.get("tie_weights", False)),
        final_norm="layer_nobias" if cfg.get("add_post_blocks_norm", True) else "none",
        norm_eps=1e-5,
        block=block,
    )


def _neurips_params(sd, cfg: Mapping[str, Any], mcfg: ModelConfig) -> dict:
    slstm_layout = "vanilla"
    if cfg.get("slstm_block") is not None:
        slstm_layout = cfg["slstm_block"]["slstm"].get("backend", "vanilla")
    from mnemax.layers.xlstm import XLSTMStack

    stack = XLSTMStack(features=mcfg.d_model, n_blocks=mcfg.n_layers, slstm_at=mcfg.block["slstm_at"], parent=None)
    slstm_idx = stack.slstm_indices()
    params: dict[str, Any] = {"embed": {"embedding": sd("token_embedding.weight")}}
    for i in range(mcfg.n_layers):
        pre = f"xlstm_block_stack.blocks.{i}."
        blk: dict[str, Any] = {"norm": {"scale": 1.0 + sd(pre + "xlstm_norm.weight")}}
        if i in slstm_idx:
            blk["slstm"] = _slstm_layer(sd, pre + "xlstm.", mcfg, slstm_layout)
            if mcfg.block["ffn_proj_factor"] is not None:
                blk["ffn_norm"] = {"scale": 1.0 + sd(pre + "ffn_norm.weight")}
                blk["ffn"] = {
                    "proj_up": {"kernel": sd(pre + "ffn.proj_up.weight").T},
                    "proj_down": {"kernel": sd(pre + "ffn.proj_down.weight").T},
                }
        else:
            blk["mlstm"] = _mlstm_layer(sd, pre + "xlstm.", mcfg)
        params[f"block_{i}"] = blk
    if mcfg.final_norm != "none":
        params["final_norm"] = {"scale": 1.0 + sd("xlstm_block_stack.post_blocks_norm.weight")}
    if not mcfg.tie_embeddings:
        params["head"] = {"kernel": sd("lm_head.weight").T}
    return params


def _conv(sd, pre: str) -> dict:
    return {"kernel": sd(pre + "conv1d.conv.weight")[:, 0, :].T, "bias": sd(pre + "conv1d.conv.bias")}


def _mlstm_layer(sd, pre: str, mcfg: ModelConfig) -> dict:
    cell = pre + "mlstm_cell."
    out = {
        "proj_up": {"kernel": sd(pre + "proj_up.weight").T},
        "q_proj": {"kernel": sd(pre + "q_proj.weight").transpose(0, 2, 1)},
        "k_proj": {"kernel": sd(pre + "k_proj.weight").transpose(0, 2, 1)},
        "v_proj": {"kernel": sd(pre + "v_proj.weight").transpose(0, 2, 1)},
        "igate": {"kernel": sd(cell + "igate.weight").T, "bias": sd(cell + "igate.bias")},
        "fgate": {"kernel": sd(cell + "fgate.weight").T, "bias": sd(cell + "fgate.bias")},
        "outnorm": 1.0 + sd(cell + "outnorm.weight"),
        "learnable_skip": sd(pre + "learnable_skip"),
        "proj_down": {"kernel": sd(pre + "proj_down.weight").T},
    }
    if mcfg.block["conv_width"]:
        out["conv"] = _conv(sd, pre)
    return out


def _slstm_layer(sd, pre: str, mcfg: ModelConfig, layout: str) -> dict:
    heads = mcfg.block["slstm_heads"]
    dh = mcfg.d_model // heads
    r = sd(pre + "slstm_cell._recurrent_kernel_")
    b = sd(pre + "slstm_cell._bias_")
    if layout == "vanilla":  # R: (heads, 4 * d_out, d_in); b: (4, heads, d) flattened
        recurrent = r.reshape(heads, 4, dh, dh).transpose(0, 3, 1, 2)
        bias = b.reshape(4, heads, dh)
    else:  # cuda: R: (heads, d_in, 4 * d_out); b: (heads, 4, d) flattened
        recurrent = r.reshape(heads, dh, 4, dh)
        bias = b.reshape(heads, 4, dh).transpose(1, 0, 2)
    # Upstream's module "fgate" computes the INPUT gate and "igate" the FORGET gate.
    gates = [sd(pre + f"{name}.weight").transpose(0, 2, 1) for name in ("fgate", "igate", "zgate", "ogate")]
    out = {
        "gate_kernel": np.stack(gates),
        "recurrent_kernel": recurrent,
        "bias": bias,
        "group_norm": 1.0 + sd(pre + "group_norm.weight"),
    }
    if mcfg.block["slstm_conv_width"]:
        out["conv"] = _conv(sd, pre)
    return out


def _large_params(sd, keys, cfg: Mapping[str, Any], mcfg: ModelConfig) -> dict:
    d, heads = mcfg.d_model, mcfg.block["num_heads"]
    qk, v = int(d * mcfg.block["qk_dim_factor"]), int(d * mcfg.block["v_dim_factor"])
    params: dict[str, Any] = {"embed": {"embedding": sd("embedding.weight")}}
    for i in range(mcfg.n_layers):
        pre = f"backbone.blocks.{i}."
        lay = pre + "mlstm_layer."
        if lay + "qkv_opreact.weight" in keys:  # weight_mode="fused"
            wq, wk, wv, wo = np.split(sd(lay + "qkv_opreact.weight"), [qk, 2 * qk, 2 * qk + v])
            wi, wf = np.split(sd(lay + "ifgate_preact.weight"), [heads])
            bi, bf = np.split(sd(lay + "ifgate_preact.bias"), [heads])
            w_gate, w_up = np.split(sd(pre + "ffn.proj_up_gate_z.weight"), 2)
        else:
            wq, wk, wv, wo = (sd(lay + f"{n}.weight") for n in ("q", "k", "v", "ogate_preact"))
            wi, wf = sd(lay + "igate_preact.weight"), sd(lay + "fgate_preact.weight")
            bi, bf = sd(lay + "igate_preact.bias"), sd(lay + "fgate_preact.bias")
            w_gate, w_up = sd(pre + "ffn.proj_up_gate.weight"), sd(pre + "ffn.proj_up.weight")
        params[f"block_{i}"] = {
            "norm_mlstm": {"scale": sd(pre + "norm_mlstm.weight")},
            "mlstm": {
                "q": {"kernel": wq.T}, "k": {"kernel": wk.T}, "v": {"kernel": wv.T},
                "ogate_preact": {"kernel": wo.T},
                "igate_preact": {"kernel": wi.T, "bias": bi},
                "fgate_preact": {"kernel": wf.T, "bias": bf},
                "multihead_norm": sd(lay + "multihead_norm.weight"),
                "out_proj": {"kernel": sd(lay + "out_proj.weight").T},
            },
            "norm_ffn": {"scale": sd(pre + "norm_ffn.weight")},
            "ffn": {
                "gate": {"kernel": w_gate.T}, "up": {"kernel": w_up.T},
                "down": {"kernel": sd(pre + "ffn.proj_down.weight").T},
            },
        }
    if mcfg.final_norm != "none":
        params["final_norm"] = {"scale": sd("backbone.out_norm.weight")}
    params["head"] = {"kernel": sd("lm_head.weight").T}
    return params


def xlstm_from_torch(state_dict: Mapping[str, Any], config, *, dtype=jnp.float32):
    """Converts a PyPI ``xlstm`` 2.0.6 language model's ``state_dict`` to mnemax.

    Args:
      state_dict: ``model.state_dict()`` of an ``xLSTMLMModel`` (NeurIPS block stack; sLSTM
        weights in the "vanilla" or "cuda" backend's storage layout, as the config says) or
        of an ``xLSTMLarge`` (7B layout; ``weight_mode`` "single" or "fused").
      config: the model's config dataclass, or ``dataclasses.asdict`` of it.
      dtype: dtype of the returned parameters.

    Returns:
      ``(model_config, variables)``: the mnemax :class:`ModelConfig` and ``{"params": ...}``
      for ``mnemax.build(model_config).apply(variables, tokens)``. The mnemax model's
      logits equal upstream's (checked against fixtures to 1e-4 in float32).
    """
    cfg = _as_dict(config)
    mcfg = xlstm_config_from_torch(cfg)
    keys = set(state_dict)

    def sd(name: str) -> np.ndarray:
        if name not in state_dict:
            raise ValueError(f"state_dict has no entry {name!r} (has {len(keys)} entries, e.g. {sorted(keys)[:3]})")
        return _to_numpy(state_dict[name])

    params = _large_params(sd, keys, cfg, mcfg) if _is_large(cfg) else _neurips_params(sd, cfg, mcfg)
    _xlstm_check_against_model(params, mcfg)
    return mcfg, {"params": jax.tree.map(lambda a: jnp.asarray(a, dtype), params)}


def _xlstm_check_against_model(params: dict, mcfg: ModelConfig) -> None:
    """Raises ValueError when the converted tree does not match the model's parameters."""
    import flax.linen as nn

    from .registry import build

    want = jax.eval_shape(build(mcfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    want = nn.meta.unbox(want)
    want_paths = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(want)}
    got_paths = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if want_paths != got_paths:
        missing = sorted(set(want_paths) - set(got_paths))
        extra = sorted(set(got_paths) - set(want_paths))
        shapes = [(k, got_paths[k], want_paths[k]) for k in set(want_paths) & set(got_paths) if got_paths[k] != want_paths[k]]
        raise ValueError(
            f"converted parameters do not match the mnemax model: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"shape mismatches (path, got, want) {shapes[:5]}"
        )
