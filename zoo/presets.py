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


# ----------------------------------------------------------------------------- MemMamba

import flax.linen as nn  # noqa: E402

from mnemax.layers.mamba import mixer_fields  # noqa: E402
from mnemax.layers.memmamba import CrossLayerRead, MemMambaBlock, run_layers  # noqa: E402

from .model import SequenceModel, _fields  # noqa: E402

# The stack's own options (the rest are MemMambaBlock fields; see mnemax.layers.memmamba).
_MEMMAMBA_MODEL_KEYS = {"cross_layer_every": 4, "cross_layer_pools": 0}

MEMMAMBA_KEYS = {
    **MAMBA_KEYS,
    "pool_size": 50,
    "pool_dim": 64,
    "num_heads": 4,
    "note_threshold": 0.5,
    "read_threshold": 0.5,
    "note_gate": "ste",
    "read_gate": "ste",
    "gate_temperature": 0.1,
    "replace": "salience",
    "score_hidden": 0,
    "fusion": "add",
    "read_bias_init": 2.0,
    "read_init_scale": 0.0,
    "pool_chunk": 1,
    "pool_impl": "chunked",
    **_MEMMAMBA_MODEL_KEYS,
}


def _memmamba_block(cfg: ModelConfig, index: int, **kw) -> MemMambaBlock:
    del index
    block = {k: v for k, v in cfg.block.items() if k not in _MEMMAMBA_MODEL_KEYS}
    return MemMambaBlock(features=cfg.d_model, n_layers=cfg.n_layers, **block, **_module_kwargs(cfg), **kw)


class MemMambaModel(SequenceModel):
    """The zoo model of the ``memmamba`` family: :class:`SequenceModel` (embedding, final
    norm, heads, state, ``layer_outputs``) with the MemMamba stack as its blocks, i.e.
    cross-layer attention (``cross_layer_<l>``) after every ``cross_layer_every``-th block.
    The parameters of the Mamba parts have the names of the ``mamba`` family's."""

    def _run_blocks(self, x, block_states, resets, residual_dt):
        cfg = self.config
        proto = _memmamba_block(cfg, 0, parent=None)
        cls = nn.remat(type(proto), methods=["forward"]) if cfg.remat else type(proto)

        def after_layer(x):
            x = x.astype(residual_dt)
            self.sow("intermediates", "layer_outputs", x)
            return x

        x, states, _ = run_layers(
            x, block_states, resets,
            lambda l: cls(**_fields(_memmamba_block(cfg, l, parent=None)), name=f"block_{l}"),
            lambda l: CrossLayerRead(**mixer_fields(proto, CrossLayerRead), name=f"cross_layer_{l}"),
            cfg.n_layers, cfg.block["cross_layer_every"], cfg.block["cross_layer_pools"], after_layer,
        )
        return x, states


register_family(
    Family(
        name="memmamba",
        make_block=_memmamba_block,
        block_keys=MEMMAMBA_KEYS,
        description="MemMamba: Mamba blocks + Note Block state pool, cross-token and sparse cross-layer attention",
        make_model=MemMambaModel,
    )
)

register_preset(
    "memmamba-tiny",
    ModelConfig(
        family="memmamba", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-5,
        block={"d_state": 8, "pool_size": 16, "pool_dim": 16, "num_heads": 2, "cross_layer_every": 2},
    ),
)
register_preset(
    "memmamba-130m",  # the mamba-130m backbone; 50-slot pools of 64-d notes, cross-layer reads every 4 layers
    ModelConfig(
        family="memmamba", d_model=768, n_layers=24, vocab_size=50280, tie_embeddings=True, norm_eps=1e-5,
        block={"d_state": 16, "d_conv": 4, "expand": 2, "pool_size": 50, "pool_dim": 64, "num_heads": 4, "cross_layer_every": 4},
    ),
)
