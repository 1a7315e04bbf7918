"""Built-in families and presets. Each family section registers its block builder
and its presets; ``mnemax.list_models()`` lists them all."""

from __future__ import annotations

from mnemax.layers.transformer import TransformerBlock

from .config import ModelConfig
from .registry import Family, register_family, register_preset


def _module_kwargs(cfg: ModelConfig) -> dict:
    return {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype}


# ----------------------------------------------------------------------------- transformer

TRANSFORMER_KEYS = {
    "num_heads": 4,
    "num_kv_heads": None,
    "head_dim": None,
    "mlp_ratio": 4.0,
    "mlp_kind": "swiglu",
    "window": 1024,
    "norm": "rms",
    "use_rope": True,
    "key_conv": 0,
    "implementation": None,
}


def _transformer_block(cfg: ModelConfig, index: int, **kw) -> TransformerBlock:
    del index
    return TransformerBlock(features=cfg.d_model, **dict(cfg.block), **_module_kwargs(cfg), **kw)


register_family(
    Family(
        name="transformer",
        make_block=_transformer_block,
        block_keys=TRANSFORMER_KEYS,
        description="pre-norm Transformer (RoPE, SwiGLU) with a sliding KV-cache state; the baseline",
    )
)

register_preset(
    "transformer-tiny",
    ModelConfig(
        family="transformer", d_model=32, n_layers=2, vocab_size=64,
        block={"num_heads": 2, "window": 64, "mlp_ratio": 2.0},
    ),
)
register_preset(
    "transformer-125m",
    ModelConfig(
        family="transformer", d_model=768, n_layers=12, vocab_size=50304, tie_embeddings=True,
        block={"num_heads": 12, "window": 2048, "mlp_ratio": 8 / 3},
    ),
)


# ----------------------------------------------------------------------------- state-space: LSSL, S4D, Mamba

from mnemax.layers.ssm import DiagonalSSMBlock, LSSLBlock, MambaBlock  # noqa: E402

_SSM_BLOCK_KEYS = {"norm": "layer", "norm_eps": 1e-5, "mlp_ratio": 0.0, "mlp_kind": "gelu"}

LSSL_KEYS = {
    "state_size": 64,
    "channels": 1,
    "measure": "legs",
    "method": "bilinear",
    "alpha": 0.5,
    "dt_min": 1e-3,
    "dt_max": 1e-1,
    "learn": 0,
    "activation": "gelu",
    "mode": "auto",
    **_SSM_BLOCK_KEYS,
}

S4D_KEYS = {
    "state_size": 64,
    "a_init": "lin",
    "dt_min": 1e-3,
    "dt_max": 1e-1,
    "activation": "gelu",
    "backend": None,
    **_SSM_BLOCK_KEYS,
}

MAMBA_KEYS = {
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "dt_rank": "auto",
    "dt_min": 1e-3,
    "dt_max": 1e-1,
    "dt_init": "random",
    "dt_scale": 1.0,
    "dt_init_floor": 1e-4,
    "conv_bias": True,
    "use_bias": False,
    "norm_eps": 1e-5,
    "residual_in_fp32": True,
    "rescale_prenorm_residual": True,
    "backend": None,
    "chunk_size": None,
}


def _lssl_block(cfg: ModelConfig, index: int, **kw) -> LSSLBlock:
    del index
    return LSSLBlock(features=cfg.d_model, **dict(cfg.block), **_module_kwargs(cfg), **kw)


def _s4d_block(cfg: ModelConfig, index: int, **kw) -> DiagonalSSMBlock:
    del index
    return DiagonalSSMBlock(features=cfg.d_model, **dict(cfg.block), **_module_kwargs(cfg), **kw)


def _mamba_block(cfg: ModelConfig, index: int, **kw) -> MambaBlock:
    del index
    return MambaBlock(features=cfg.d_model, n_layers=cfg.n_layers, **dict(cfg.block), **_module_kwargs(cfg), **kw)


register_family(
    Family(
        name="lssl",
        make_block=_lssl_block,
        block_keys=LSSL_KEYS,
        description="Linear State-Space Layer (HiPPO A, learned dt, FFT-conv training, recurrent stepping)",
    )
)
register_family(
    Family(
        name="s4d",
        make_block=_s4d_block,
        block_keys=S4D_KEYS,
        description="diagonal state-space layer (S4D-Lin/Inv/Real, ZOH) on linear_scan",
    )
)
register_family(
    Family(
        name="mamba",
        make_block=_mamba_block,
        block_keys=MAMBA_KEYS,
        description="Mamba (selective SSM, S6) blocks: RMSNorm pre-norm, fp32 residual",
    )
)

register_preset(
    "lssl-tiny",
    ModelConfig(family="lssl", d_model=16, n_layers=2, vocab_size=32, block={"state_size": 8, "channels": 2, "dt_min": 1e-2, "dt_max": 0.5}),
)
register_preset(
    "lssl-small",  # sequence classification, e.g. sequential MNIST / ListOps-style inputs
    ModelConfig(
        family="lssl", d_model=128, n_layers=4, input_dim=1, head="classify", num_classes=10, pool="mean",
        final_norm="layer", block={"state_size": 64, "channels": 1, "mlp_ratio": 2.0},
    ),
)
register_preset(
    "s4d-tiny",
    ModelConfig(family="s4d", d_model=16, n_layers=2, vocab_size=32, block={"state_size": 8, "dt_min": 1e-2, "dt_max": 0.5}),
)
register_preset(
    "mamba-tiny",
    ModelConfig(
        family="mamba", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-5,
        block={"d_state": 8},
    ),
)
register_preset(
    "mamba-130m",  # the state-spaces/mamba-130m layout (vocab 50277 padded to 50280)
    ModelConfig(
        family="mamba", d_model=768, n_layers=24, vocab_size=50280, tie_embeddings=True, norm_eps=1e-5,
        block={"d_state": 16, "d_conv": 4, "expand": 2},
    ),
)
