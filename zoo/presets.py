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
