"""HF ``transformers`` Mamba weights -> a mnemax ``mamba`` model: ``(ModelConfig, {"params": ...})``
ready for ``mnemax.build(config).apply`` (logits held equal by tests/test_mamba.py's fixtures)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


from ..config import ModelConfig
from .common import cfg_get, family_block_defaults, finish_hf_lm, hf_backbone


def mamba_config_from_transformers(hf_config) -> ModelConfig:
    """The mnemax ``ModelConfig`` of an HF ``MambaConfig`` (object or its ``to_dict()``)."""
    get = lambda k, d=None: cfg_get(hf_config, k, d)  # noqa: E731
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
            **family_block_defaults("mamba"),
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


def mamba_from_transformers(state_dict: Mapping[str, Any], hf_config) -> tuple[ModelConfig, dict]:
    """Converts HF ``transformers`` Mamba weights (``MambaForCausalLM`` with ``backbone.``
    prefixes and ``lm_head``, or a bare ``MambaModel``; ``embedding``/``embeddings``) to
    a ``mamba`` ``ModelConfig`` and its params. A ``MambaModel`` has no head: its LM
    head is the tied embedding.

    Layout: in_proj (2E, d) -> kernel (d, 2, E) [x rows first, then z]; conv1d (E, 1, W)
    -> kernel (W, E); x_proj, dt_proj, out_proj, lm_head transposed; dt_proj.bias ->
    ``dt_bias``; norms' ``weight`` -> ``scale``.
    """
    config = mamba_config_from_transformers(hf_config)
    sd = hf_backbone(state_dict, config.tie_embeddings)
    take = sd.take

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
    return finish_hf_lm(sd, config, params)

