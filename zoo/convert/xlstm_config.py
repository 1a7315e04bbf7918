"""Reading a PyPI ``xlstm`` 2.0.6 config for the converter (:mod:`mnemax.convert.xlstm`).

The config may be upstream's dataclass, ``dataclasses.asdict`` of it, or the keyword
arguments it was built from (nested sub-configs as dicts or dataclasses). Fields left out
take upstream's defaults, written down here (``UPSTREAM_DEFAULTS``, held equal to the
package's own by ``tests/test_xlstm_convert.py``); no torch import. Every width upstream
rounds is computed by :mod:`mnemax.layers.xlstm_widths`. Bad configs raise ``ValueError``
naming the field by its path in upstream's config (``config.slstm_block.slstm.num_heads``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from mnemax.layers.xlstm import XLSTMStack
from mnemax.layers.xlstm_cells import FFN_ACTIVATIONS, SLSTM_BIAS_INITS
from mnemax.layers.xlstm_widths import large_ffn_dim, large_qk_v_dims, qkv_proj_blocks, up_proj_dim

from ..config import ModelConfig

# ----------------------------------------------------------------------------- upstream's defaults

# xlstm 2.0.6 xlstm/xlstm_large/model.py::xLSTMLargeConfig (embedding_dim, num_heads,
# num_blocks and vocab_size have no default).
LARGE_DEFAULTS: dict[str, Any] = {
    "use_bias": False,
    "norm_eps": 1e-6,
    "norm_reduction_force_float32": True,
    "add_out_norm": True,
    "qk_dim_factor": 0.5,
    "v_dim_factor": 1.0,
    "chunkwise_kernel": "chunkwise--triton_limit_chunk",
    "sequence_kernel": "native_sequence__triton",
    "step_kernel": "triton",
    "mode": "train",
    "chunk_size": 64,
    "return_last_states": False,
    "autocast_kernel_dtype": "bfloat16",
    "eps": 1e-6,
    "inference_state_dtype": "float32",
    "ffn_proj_factor": 2.6667,
    "ffn_round_up_to_multiple_of": 64,
    "gate_soft_cap": 15.0,
    "output_logit_soft_cap": 30.0,
    "weight_mode": "single",
}
LARGE_REQUIRED = ("embedding_dim", "num_heads", "num_blocks", "vocab_size")

# xlstm/xlstm_block_stack.py::xLSTMBlockStackConfig, xlstm/xlstm_lm_model.py::xLSTMLMModelConfig
BLOCK_STACK_DEFAULTS: dict[str, Any] = {
    "mlstm_block": None,
    "slstm_block": None,
    "context_length": -1,
    "num_blocks": 1,
    "embedding_dim": 128,
    "add_post_blocks_norm": True,
    "bias": False,
    "dropout": 0.0,
    "slstm_at": [],
    "_block_map": None,
}
LM_MODEL_DEFAULTS: dict[str, Any] = {
    **BLOCK_STACK_DEFAULTS,
    "vocab_size": -1,
    "tie_weights": False,
    "weight_decay_on_embedding": False,
    "add_embedding_dropout": False,
}

# xlstm/blocks/mlstm/layer.py::mLSTMLayerConfig (with utils.py::UpProjConfigMixin)
MLSTM_LAYER_DEFAULTS: dict[str, Any] = {
    "conv1d_kernel_size": 4,
    "qkv_proj_blocksize": 4,
    "num_heads": 4,
    "proj_factor": 2.0,
    "round_proj_up_dim_up": True,
    "round_proj_up_to_multiple_of": 64,
    "embedding_dim": -1,
    "bias": False,
    "dropout": 0.0,
    "context_length": -1,
    "_num_blocks": 1,
    "_proj_up_dim": None,
    "_inner_embedding_dim": None,
}

# xlstm/blocks/slstm/layer.py::sLSTMLayerConfig (with cell.py::sLSTMCellConfig); the fields
# that only choose kernels, dtypes or gradient tricks are accepted and do not change the model.
SLSTM_LAYER_DEFAULTS: dict[str, Any] = {
    "hidden_size": -1,
    "num_heads": 4,
    "num_states": 4,
    "backend": "cuda",
    "function": "slstm",
    "bias_init": "powerlaw_blockdependent",
    "recurrent_weight_init": "zeros",
    "_block_idx": 0,
    "_num_blocks": 1,
    "num_gates": 4,
    "gradient_recurrent_cut": False,
    "gradient_recurrent_clipval": None,
    "forward_clipval": None,
    "batch_size": 8,
    "input_shape": "BSGNH",
    "internal_input_shape": "SBNGH",
    "output_shape": "BNSH",
    "constants": {},
    "dtype": "bfloat16",
    "dtype_b": "float32",
    "dtype_r": None,
    "dtype_w": None,
    "dtype_g": None,
    "dtype_s": None,
    "dtype_a": None,
    "enable_automatic_mixed_precision": True,
    "initial_val": 0.0,
    "embedding_dim": -1,
    "conv1d_kernel_size": 4,
    "group_norm_weight": True,
    "dropout": 0.0,
}

# xlstm/components/feedforward.py::FeedForwardConfig
FEEDFORWARD_DEFAULTS: dict[str, Any] = {
    "proj_factor": 1.3,
    "round_proj_up_dim_up": True,
    "round_proj_up_to_multiple_of": 64,
    "_proj_up_dim": None,
    "act_fn": "gelu",
    "embedding_dim": -1,
    "dropout": 0.0,
    "bias": False,
    "ff_type": "ffn_gated",
    "_num_blocks": 1,
}

# mLSTMBlockConfig / sLSTMBlockConfig: their sub-configs default to the layer configs' defaults.
MLSTM_BLOCK_DEFAULTS: dict[str, Any] = {"mlstm": MLSTM_LAYER_DEFAULTS, "_num_blocks": None, "_block_idx": None}
SLSTM_BLOCK_DEFAULTS: dict[str, Any] = {
    "slstm": SLSTM_LAYER_DEFAULTS,
    "feedforward": FEEDFORWARD_DEFAULTS,
    "_num_blocks": None,
    "_block_idx": None,
}

UPSTREAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "xLSTMLargeConfig": LARGE_DEFAULTS,
    "xLSTMBlockStackConfig": BLOCK_STACK_DEFAULTS,
    "xLSTMLMModelConfig": LM_MODEL_DEFAULTS,
    "mLSTMBlockConfig": MLSTM_BLOCK_DEFAULTS,
    "mLSTMLayerConfig": MLSTM_LAYER_DEFAULTS,
    "sLSTMBlockConfig": SLSTM_BLOCK_DEFAULTS,
    "sLSTMLayerConfig": SLSTM_LAYER_DEFAULTS,
    "FeedForwardConfig": FEEDFORWARD_DEFAULTS,
}

WEIGHT_MODES = ("single", "fused")  # xLSTMLarge storage layouts
SLSTM_BACKENDS = ("vanilla", "cuda")  # sLSTM storage layouts of the recurrent kernel and bias

# ----------------------------------------------------------------------------- reading a config


def as_dict(config, path: str) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(
        f"{path} must be an xlstm config dataclass, dataclasses.asdict of one, or its keyword arguments (a dict), "
        f"got {type(config).__name__}"
    )


def _fill(config, defaults: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``config`` (dataclass, asdict or kwargs) with upstream's defaults for absent fields."""
    cfg = as_dict(config, path)
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"{path} has fields upstream's config does not have: {unknown}; known: {sorted(defaults)}")
    return {**defaults, **cfg}


def _positive_int(cfg: Mapping[str, Any], key: str, path: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{path}.{key} must be a positive integer, got {value!r}")
    return int(value)


def _positive(cfg: Mapping[str, Any], key: str, path: str) -> float:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not value > 0:
        raise ValueError(f"{path}.{key} must be a positive number, got {value!r}")
    return value


def _choice(cfg: Mapping[str, Any], key: str, allowed, path: str, what: str = ""):
    value = cfg[key]
    if value not in allowed:
        raise ValueError(f"{path}.{key} must be one of {list(allowed)}{what}, got {value!r}")
    return value


def _unsupported(cond: bool, field: str, what: str) -> None:
    if cond:
        raise ValueError(f"{field}: {what} is not supported by the mnemax xLSTM layers")


def config_layout(cfg: Mapping[str, Any]) -> str:
    """'large' (xLSTMLargeConfig) or 'neurips' (xLSTMBlockStackConfig / xLSTMLMModelConfig)."""
    shared = {"embedding_dim", "num_blocks", "vocab_size"}
    large_only = (set(LARGE_DEFAULTS) | set(LARGE_REQUIRED)) - shared
    neurips_only = set(LM_MODEL_DEFAULTS) - shared
    large, neurips = sorted(set(cfg) & large_only), sorted(set(cfg) & neurips_only)
    if large and neurips:
        raise ValueError(
            f"config mixes fields of xLSTMLargeConfig {large} and of xLSTMBlockStackConfig/xLSTMLMModelConfig {neurips}"
        )
    if large:
        return "large"
    if "mlstm_block" in cfg or "slstm_block" in cfg:
        return "neurips"
    raise ValueError(
        "config is neither an xLSTMLargeConfig (needs num_heads) nor an xLSTMBlockStackConfig/xLSTMLMModelConfig "
        f"(needs mlstm_block and/or slstm_block): fields {sorted(cfg)}"
    )


def _large_block(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The mnemax ``xlstm_large`` block keys of a filled, validated xLSTMLargeConfig dict."""
    p = "config"
    d = _positive_int(cfg, "embedding_dim", p)
    heads = _positive_int(cfg, "num_heads", p)
    _choice(cfg, "weight_mode", WEIGHT_MODES, p, " (the storage layout of the mLSTM and FFN weights)")
    _unsupported(bool(cfg["use_bias"]), f"{p}.use_bias", "use_bias=True")
    qk, v = large_qk_v_dims(d, _positive(cfg, "qk_dim_factor", p), _positive(cfg, "v_dim_factor", p))
    if qk < heads or qk % heads or v % heads:
        raise ValueError(
            f"{p}.num_heads ({heads}) must divide the qk width int(embedding_dim * qk_dim_factor) = {qk} and the "
            f"value width int(embedding_dim * v_dim_factor) = {v}"
        )
    multiple = _positive_int(cfg, "ffn_round_up_to_multiple_of", p)
    if large_ffn_dim(d, _positive(cfg, "ffn_proj_factor", p), multiple) <= 0:
        raise ValueError(f"{p}.ffn_proj_factor {cfg['ffn_proj_factor']} gives an FFN width of 0 at embedding_dim {d}")
    return {
        "num_heads": heads,
        "qk_dim_factor": cfg["qk_dim_factor"],
        "v_dim_factor": cfg["v_dim_factor"],
        "gate_soft_cap": cfg["gate_soft_cap"],
        "ffn_proj_factor": cfg["ffn_proj_factor"],
        "ffn_round_to": multiple,
        "chunk_size": _positive_int(cfg, "chunk_size", p),
        "eps": cfg["eps"],
        "norm_eps": cfg["norm_eps"],
    }


def _round_mode(cfg: Mapping[str, Any], path: str) -> str:
    if not isinstance(cfg["round_proj_up_dim_up"], bool | np.bool_):
        raise ValueError(f"{path}.round_proj_up_dim_up must be True or False, got {cfg['round_proj_up_dim_up']!r}")
    return "up" if cfg["round_proj_up_dim_up"] else "down"


def _check_derived(cfg: Mapping[str, Any], key: str, computed: int, path: str) -> None:
    """asdict of an upstream config carries its computed widths: they must be ours."""
    if cfg.get(key) not in (None, 0, computed):
        raise ValueError(f"{path}.{key} is {cfg[key]}, but upstream's rule gives {computed} for this config")


def _non_negative_int(cfg: Mapping[str, Any], key: str, path: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{path}.{key} must be an integer >= 0, got {value!r}")
    return int(value)


def _up_proj(cfg: Mapping[str, Any], d: int, path: str) -> tuple[int, int, str]:
    """``(width, multiple, mode)`` of an UpProjConfigMixin config (mLSTM layer, feed-forward)."""
    mode = _round_mode(cfg, path)
    multiple = _positive_int(cfg, "round_proj_up_to_multiple_of", path)
    width = up_proj_dim(d, _positive(cfg, "proj_factor", path), multiple, mode)
    if width <= 0:
        raise ValueError(f"{path}.proj_factor {cfg['proj_factor']} x {d} rounded {mode} to a multiple of {multiple} is 0")
    _check_derived(cfg, "_proj_up_dim", width, path)
    return width, multiple, mode


def _mlstm_fields(mblock, d: int, path: str) -> dict[str, Any]:
    """XLSTMStack's mLSTM keywords of an mLSTMBlockConfig (validated)."""
    mp = f"{path}.mlstm"
    m = _fill(_fill(mblock, MLSTM_BLOCK_DEFAULTS, path)["mlstm"], MLSTM_LAYER_DEFAULTS, mp)
    _unsupported(bool(m["bias"]), f"{mp}.bias", "bias=True")
    inner, multiple, mode = _up_proj(m, d, mp)
    _check_derived(m, "_inner_embedding_dim", inner, mp)
    heads = _positive_int(m, "num_heads", mp)
    if inner % heads:
        raise ValueError(f"{mp}.num_heads ({heads}) must divide the inner width {inner}")
    blocksize = _positive_int(m, "qkv_proj_blocksize", mp)
    blocks = qkv_proj_blocks(inner, blocksize)
    if blocks <= 0 or inner % blocks:
        raise ValueError(
            f"{mp}.qkv_proj_blocksize ({blocksize}) must split the inner width {inner} into equal blocks "
            f"(inner // qkv_proj_blocksize = {blocks})"
        )
    return dict(
        num_heads=heads, proj_factor=m["proj_factor"], round_to=multiple, round_mode=mode,
        conv_width=_non_negative_int(m, "conv1d_kernel_size", mp), qkv_blocksize=blocksize,
    )


def _slstm_fields(sblock, d: int, path: str) -> tuple[dict[str, Any], str, bool]:
    """XLSTMStack's sLSTM and FFN keywords of an sLSTMBlockConfig (validated), the sLSTM
    storage layout ("vanilla"/"cuda") and whether the group norm has a weight."""
    sb = _fill(sblock, SLSTM_BLOCK_DEFAULTS, path)
    sp = f"{path}.slstm"
    s = _fill(sb["slstm"], SLSTM_LAYER_DEFAULTS, sp)
    heads = s["num_heads"]
    if isinstance(heads, bool) or not isinstance(heads, int | np.integer):
        raise ValueError(f"{sp}.num_heads must be an integer, got {heads!r}")
    heads = max(int(heads), 1)  # upstream's sLSTMCellConfig turns num_heads <= 0 into 1
    if d % heads:
        raise ValueError(f"{sp}.num_heads ({heads}) must divide embedding_dim ({d})")
    backend = _choice(s, "backend", SLSTM_BACKENDS, sp, " (the storage layout of the recurrent kernel and bias)")
    _choice(s, "function", ("slstm",), sp)
    _choice(s, "bias_init", SLSTM_BIAS_INITS, sp)
    _unsupported(s["num_gates"] != 4 or s["num_states"] != 4, f"{sp}.num_gates/num_states", "a cell other than 4 gates, 4 states")
    fields: dict[str, Any] = dict(
        slstm_heads=heads, slstm_conv_width=_non_negative_int(s, "conv1d_kernel_size", sp), slstm_bias_init=s["bias_init"]
    )
    if sb["feedforward"] is None:
        fields["ffn_proj_factor"] = None
    else:
        fp = f"{path}.feedforward"
        ff = _fill(sb["feedforward"], FEEDFORWARD_DEFAULTS, fp)
        _unsupported(bool(ff["bias"]), f"{fp}.bias", "bias=True")
        _choice(ff, "ff_type", ("ffn_gated",), fp)
        _choice(ff, "act_fn", tuple(FFN_ACTIVATIONS), fp)
        _, multiple, mode = _up_proj(ff, d, fp)
        fields.update(ffn_proj_factor=ff["proj_factor"], ffn_act=ff["act_fn"], ffn_round_to=multiple, ffn_round_mode=mode)
    return fields, backend, bool(s["group_norm_weight"])


@dataclasses.dataclass(frozen=True)
class NeuripsLayout:
    """A parsed xLSTMBlockStackConfig / xLSTMLMModelConfig: the mnemax stack's fields and
    what the weight mapping needs."""

    stack: dict[str, Any]  # XLSTMStack keywords (features, n_blocks, post_norm, block keys)
    slstm_indices: tuple[int, ...]
    slstm_backend: str
    group_norm_weight: bool
    vocab_size: int | None
    tie_weights: bool

    @property
    def block(self) -> dict[str, Any]:
        """The block keys of the zoo's ``xlstm`` family."""
        return {k: v for k, v in self.stack.items() if k not in ("features", "n_blocks", "post_norm")}


def neurips_layout(config, lm: bool) -> NeuripsLayout:
    p = "config"
    cfg = _fill(config, LM_MODEL_DEFAULTS if lm else {**BLOCK_STACK_DEFAULTS, **_lm_fields(config)}, p)
    d = _positive_int(cfg, "embedding_dim", p)
    n = _positive_int(cfg, "num_blocks", p)
    _unsupported(bool(cfg["bias"]), f"{p}.bias", "bias=True")
    stack: dict[str, Any] = {"features": d, "n_blocks": n, "post_norm": bool(cfg["add_post_blocks_norm"])}

    mblock, sblock = cfg["mlstm_block"], cfg["slstm_block"]
    if mblock is None and sblock is None:
        raise ValueError(f"{p}.mlstm_block and {p}.slstm_block are both None: the stack would have no blocks")
    slstm_at = cfg["slstm_at"]
    if mblock is None:
        slstm_at = "all"  # upstream's __post_init__
    if slstm_at == "all":
        at = tuple(range(n))
    else:
        if isinstance(slstm_at, str) or not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in slstm_at):
            raise ValueError(f"{p}.slstm_at must be 'all' or a list of block indices, got {slstm_at!r}")
        at = tuple(sorted({int(i) for i in slstm_at}))
        if any(not 0 <= i < n for i in at):
            raise ValueError(f"{p}.slstm_at indices must lie in [0, num_blocks={n}), got {list(slstm_at)}")
    if at and sblock is None:
        raise ValueError(f"{p}.slstm_at places sLSTM blocks at {list(at)} but {p}.slstm_block is None")
    stack["slstm_at"] = "all" if len(at) == n else at

    if mblock is not None:
        stack.update(_mlstm_fields(mblock, d, f"{p}.mlstm_block"))
    backend, group_norm_weight = "vanilla", True
    if sblock is not None:
        fields, backend, group_norm_weight = _slstm_fields(sblock, d, f"{p}.slstm_block")
        stack.update(fields)

    vocab = None
    if lm:
        vocab = cfg["vocab_size"]
        if isinstance(vocab, bool) or not isinstance(vocab, int | np.integer) or vocab <= 0:
            raise ValueError(f"{p}.vocab_size must be a positive integer (an xLSTMLMModelConfig), got {vocab!r}")
        vocab = int(vocab)
    return NeuripsLayout(
        stack=stack, slstm_indices=at, slstm_backend=backend, group_norm_weight=group_norm_weight,
        vocab_size=vocab, tie_weights=bool(cfg.get("tie_weights", False)),
    )


def _lm_fields(config) -> dict[str, Any]:
    """The xLSTMLMModelConfig-only fields a stack config may carry (an LM config is a stack config)."""
    cfg = as_dict(config, "config")
    return {k: LM_MODEL_DEFAULTS[k] for k in set(LM_MODEL_DEFAULTS) - set(BLOCK_STACK_DEFAULTS) if k in cfg}


def xlstm_config_from_torch(config) -> ModelConfig:
    """The mnemax :class:`ModelConfig` of a PyPI ``xlstm`` 2.0.6 language model's config.

    ``config``: an ``xLSTMLMModelConfig`` (NeurIPS block stack) or an ``xLSTMLargeConfig``
    (7B layout) -- the dataclass, ``dataclasses.asdict`` of it, or its keyword arguments.
    """
    cfg = as_dict(config, "config")
    if config_layout(cfg) == "large":
        missing = [k for k in LARGE_REQUIRED if k not in cfg]
        if missing:
            raise ValueError(f"config (an xLSTMLargeConfig) needs {missing}: upstream has no default for them")
        cfg = _fill(cfg, {**LARGE_DEFAULTS, **{k: None for k in LARGE_REQUIRED}}, "config")
        block = _large_block(cfg)
        return ModelConfig(
            family="xlstm_large",
            d_model=cfg["embedding_dim"],
            n_layers=_positive_int(cfg, "num_blocks", "config"),
            vocab_size=_positive_int(cfg, "vocab_size", "config"),
            final_norm="rms" if cfg["add_out_norm"] else "none",
            norm_eps=cfg["norm_eps"],
            logit_soft_cap=cfg["output_logit_soft_cap"],
            block=block,
        )
    layout = neurips_layout(cfg, lm=True)
    return neurips_model_config(layout)


def neurips_model_config(layout: NeuripsLayout) -> ModelConfig:
    return ModelConfig(
        family="xlstm",
        d_model=layout.stack["features"],
        n_layers=layout.stack["n_blocks"],
        vocab_size=layout.vocab_size,
        tie_embeddings=layout.tie_weights,
        final_norm="layer_nobias" if layout.stack["post_norm"] else "none",
        norm_eps=1e-5,
        block=layout.block,
    )


def xlstm_stack_config_from_torch(config) -> XLSTMStack:
    """The unbound mnemax :class:`~mnemax.layers.XLSTMStack` of an ``xLSTMBlockStackConfig``
    (or an ``xLSTMLMModelConfig``, whose block stack it describes): dataclass, asdict or kwargs."""
    cfg = as_dict(config, "config")
    if config_layout(cfg) != "neurips":
        raise ValueError("config is an xLSTMLargeConfig; a bare block stack has an xLSTMBlockStackConfig")
    return XLSTMStack(**neurips_layout(cfg, lm=False).stack, parent=None)
