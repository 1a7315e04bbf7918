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


# ----------------------------------------------------------------------------- xLSTM

from mnemax.layers.xlstm import XLSTMLargeBlock, XLSTMStack  # noqa: E402

XLSTM_KEYS = {
    "slstm_at": (),  # block indices of sLSTM blocks, or "all"
    "num_heads": 4,  # mLSTM heads
    "proj_factor": 2.0,
    "conv_width": 4,
    "qkv_blocksize": 4,
    "chunk_size": 64,
    "eps": 1e-6,
    "backend": None,
    "slstm_heads": 4,
    "slstm_conv_width": 4,
    "slstm_bias_init": "powerlaw_blockdependent",
    "slstm_backend": None,
    "ffn_proj_factor": 1.3,
    "ffn_act": "gelu",
    "norm_eps": 1e-5,
}


def _xlstm_block(cfg: ModelConfig, index: int, **kw):
    stack = XLSTMStack(
        features=cfg.d_model, n_blocks=cfg.n_layers, post_norm=False, **dict(cfg.block), **_module_kwargs(cfg),
        parent=None,
    )
    return stack.make_block(index, **kw)


register_family(
    Family(
        name="xlstm",
        make_block=_xlstm_block,
        block_keys=XLSTM_KEYS,
        description="xLSTM[a:b] (NeurIPS 2024): mLSTM blocks with sLSTM blocks at slstm_at",
    )
)

XLSTM_LARGE_KEYS = {
    "num_heads": 8,
    "qk_dim_factor": 0.5,
    "v_dim_factor": 1.0,
    "gate_soft_cap": 15.0,
    "ffn_proj_factor": 2.6667,
    "ffn_round_to": 64,
    "chunk_size": 64,
    "eps": 1e-6,
    "norm_eps": 1e-6,
    "backend": None,
}


def _xlstm_large_block(cfg: ModelConfig, index: int, **kw):
    del index
    return XLSTMLargeBlock(
        features=cfg.d_model, num_blocks=cfg.n_layers, **dict(cfg.block), **_module_kwargs(cfg), **kw
    )


register_family(
    Family(
        name="xlstm_large",
        make_block=_xlstm_large_block,
        block_keys=XLSTM_LARGE_KEYS,
        description="xLSTM 7B layout: RMSNorm, mLSTM with soft-capped gates, SwiGLU FFN",
    )
)

def _small_init_std(d: int) -> float:
    """Upstream xLSTM initialises the token embedding with N(0, 2 / (5 d))."""
    return (2.0 / (5.0 * d)) ** 0.5


_XLSTM_TINY = dict(
    family="xlstm", d_model=32, n_layers=2, vocab_size=64, final_norm="layer_nobias", norm_eps=1e-5,
    embed_init_std=_small_init_std(32),
)
_XLSTM_TINY_BLOCK = {"num_heads": 2, "slstm_heads": 2, "chunk_size": 16}
register_preset("xlstm-tiny", ModelConfig(**_XLSTM_TINY, block={**_XLSTM_TINY_BLOCK, "slstm_at": (1,)}))
register_preset("slstm-tiny", ModelConfig(**_XLSTM_TINY, block={**_XLSTM_TINY_BLOCK, "slstm_at": "all"}))
register_preset("mlstm-tiny", ModelConfig(**_XLSTM_TINY, block={**_XLSTM_TINY_BLOCK, "slstm_at": ()}))
# Paper sizes, xLSTM[7:1]: one sLSTM block in every eight (the paper fixes the ratio; the
# positions 3, 11, 19, ... are our choice).
register_preset(
    "xlstm-125m",
    ModelConfig(
        family="xlstm", d_model=768, n_layers=24, vocab_size=50304, final_norm="layer_nobias", norm_eps=1e-5,
        embed_init_std=_small_init_std(768), block={"slstm_at": (3, 11, 19)},
    ),
)
register_preset(
    "xlstm-1.3b",
    ModelConfig(
        family="xlstm", d_model=2048, n_layers=48, vocab_size=50304, final_norm="layer_nobias", norm_eps=1e-5,
        embed_init_std=_small_init_std(2048), block={"slstm_at": (3, 11, 19, 27, 35, 43)},
    ),
)
# xLSTM 7B (Beck et al., 2025): shapes of the released model (build with jax.eval_shape).
register_preset(
    "xlstm-7b",
    ModelConfig(
        family="xlstm_large", d_model=4096, n_layers=32, vocab_size=50304, final_norm="rms", norm_eps=1e-6,
        logit_soft_cap=30.0, embed_init_std=_small_init_std(4096), block={"num_heads": 8},
    ),
)
