"""HF ``transformers`` Mamba-2 weights -> a mnemax ``mamba2`` model: ``(ModelConfig, {"params": ...})``
ready for ``mnemax.build(config).apply`` (logits held equal by tests/test_mamba2.py's fixtures)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


from ..config import ModelConfig
from .common import cfg_get, family_block_defaults, finish_hf_lm, hf_backbone


def mamba2_config_from_transformers(hf_config) -> ModelConfig:
    """The mnemax ``ModelConfig`` of an HF ``Mamba2Config`` (object or its ``to_dict()``).

    ``layer_norm_epsilon`` is the epsilon of the pre-norms, the final norm and the mixer's
    gated norm (``norm_eps``); ``time_step_limit`` (0, inf) is no clip (``dt_limit=None``).
    ``chunk_size`` is not carried over: it only tiles the computation (mnemax's own default
    is kept). ``time_step_rank`` is unused by Mamba-2."""
    get = lambda k, d=None: cfg_get(hf_config, k, d)  # noqa: E731
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hf_config.hidden_act must be 'silu' (Mamba-2's activation), got {act!r}")
    d_model = int(get("hidden_size"))
    expand = get("expand", 2)
    inner = int(expand * d_model)
    head_dim = int(get("head_dim", 64))
    heads = get("num_heads", None)
    if heads is not None and int(heads) * head_dim != inner:
        raise ValueError(
            f"hf_config.num_heads * head_dim must be expand * hidden_size = {inner}, got {heads} * {head_dim}"
        )
    limit = get("time_step_limit", (0.0, float("inf")))
    limit = tuple(float(v) for v in limit) if limit is not None else None
    dt_limit = None if limit is None or limit == (0.0, math.inf) else limit
    eps = float(get("layer_norm_epsilon", 1e-5))
    return ModelConfig(
        family="mamba2",
        d_model=d_model,
        n_layers=int(get("num_hidden_layers")),
        vocab_size=int(get("vocab_size")),
        tie_embeddings=bool(get("tie_word_embeddings", True)),
        final_norm="rms",
        norm_eps=eps,
        block={
            **family_block_defaults("mamba2"),
            "d_state": int(get("state_size", 128)),
            "d_conv": int(get("conv_kernel", 4)),
            "expand": expand,
            "head_dim": head_dim,
            "n_groups": int(get("n_groups", 1)),
            "dt_min": float(get("time_step_min", 1e-3)),
            "dt_max": float(get("time_step_max", 1e-1)),
            "dt_init_floor": float(get("time_step_floor", 1e-4)),
            "dt_limit": dt_limit,
            "conv_bias": bool(get("use_conv_bias", True)),
            "use_bias": bool(get("use_bias", False)),
            "norm_eps": eps,
            "residual_in_fp32": bool(get("residual_in_fp32", True)),
            "rescale_prenorm_residual": bool(get("rescale_prenorm_residual", False)),
        },
    )


def mamba2_from_transformers(state_dict: Mapping[str, Any], hf_config) -> tuple[ModelConfig, dict]:
    """Converts HF ``transformers`` Mamba-2 weights (``Mamba2ForCausalLM`` with ``backbone.``
    prefixes and ``lm_head``, or a bare ``Mamba2Model``; ``embedding``/``embeddings``) to a
    ``mamba2`` ``ModelConfig`` and its params. A ``Mamba2Model`` has no head: its LM head is
    the tied embedding.

    Layout: in_proj (E + conv_dim + H, d) -> kernel (d, E + conv_dim + H), its rows
    [z | x | B | C | dt] kept in that order; conv1d (conv_dim, 1, W) -> kernel (W, conv_dim);
    out_proj, lm_head transposed; the mixer's gated ``norm.weight`` -> ``norm.scale``;
    ``dt_bias``, ``A_log``, ``D`` (H,) as they are; norms' ``weight`` -> ``scale``.
    """
    config = mamba2_config_from_transformers(hf_config)
    sd = hf_backbone(state_dict, config.tie_embeddings)
    take = sd.take

    block = config.block
    params: dict[str, Any] = {"embed": {"embedding": take("embeddings.weight")}}
    for i in range(config.n_layers):
        p = f"layers.{i}.mixer."
        mixer = {
            "in_proj": {"kernel": take(p + "in_proj.weight").T},
            "conv1d": {"kernel": take(p + "conv1d.weight")[:, 0, :].T},
            "dt_bias": take(p + "dt_bias"),
            "A_log": take(p + "A_log"),
            "D": take(p + "D"),
            "norm": {"scale": take(p + "norm.weight")},
            "out_proj": {"kernel": take(p + "out_proj.weight").T},
        }
        if block.conv_bias:
            mixer["conv1d"]["bias"] = take(p + "conv1d.bias")
        if block.use_bias:
            mixer["in_proj"]["bias"] = take(p + "in_proj.bias")
            mixer["out_proj"]["bias"] = take(p + "out_proj.bias")
        params[f"block_{i}"] = {"norm": {"scale": take(f"layers.{i}.norm.weight")}, "mixer": mixer}
    return finish_hf_lm(sd, config, params)
