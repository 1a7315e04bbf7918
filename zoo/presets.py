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
    "query_block": 256,  # past window + query_block steps, queries go in blocks (memory linear in T)
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
# ~125M language models of the throughput benchmark (benchmarks/throughput.py), sized like
# mamba-130m (d 768, 24 layers, tied 50k embedding) with an MLP after each SSM layer.
register_preset(
    "s4d-125m",
    ModelConfig(family="s4d", d_model=768, n_layers=24, vocab_size=50280, tie_embeddings=True,
                block={"state_size": 64, "mlp_ratio": 2.5}),
)
register_preset(
    "lssl-125m",
    ModelConfig(family="lssl", d_model=768, n_layers=24, vocab_size=50280, tie_embeddings=True,
                block={"state_size": 64, "channels": 1, "mlp_ratio": 2.5}),
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
register_preset(
    "mamba-1.4b",  # the state-spaces/mamba-1.4b layout (d 2048, 48 layers); for the multi-GPU scaling runs
    ModelConfig(
        family="mamba", d_model=2048, n_layers=48, vocab_size=50280, tie_embeddings=True, norm_eps=1e-5,
        block={"d_state": 16, "d_conv": 4, "expand": 2},
    ),
)


# ----------------------------------------------------------------------------- hopfield

from mnemax.layers.causal_hopfield import CausalHopfieldBlock, HopfieldPoolingBlock  # noqa: E402

HOPFIELD_KEYS = {
    "num_heads": 4,
    "hidden_size": None,
    "pattern_size": None,
    "memory_size": 256,
    "include_current": False,
    "scaling": None,
    "update_steps_max": 0,
    "update_steps_eps": 1e-4,
    "normalize_hopfield_space": False,
    "key_conv": 0,  # > 0: causal conv of that width on the stored-pattern path (binds a value to its key)
    "mlp_ratio": 4.0,
    "mlp_kind": "swiglu",
    "norm": "rms",
    "pool_last": False,
    "pool_queries": 1,
}


def _hopfield_block(cfg: ModelConfig, index: int, **kw):
    b = dict(cfg.block)
    pool_last, queries = b.pop("pool_last"), b.pop("pool_queries")
    if pool_last and index == cfg.n_layers - 1:
        return HopfieldPoolingBlock(
            features=cfg.d_model, num_heads=b["num_heads"], num_queries=queries, memory_size=b["memory_size"],
            hidden_size=b["hidden_size"], pattern_size=b["pattern_size"], scaling=b["scaling"],
            update_steps_max=b["update_steps_max"], update_steps_eps=b["update_steps_eps"],
            **_module_kwargs(cfg), **kw,
        )
    return CausalHopfieldBlock(features=cfg.d_model, **b, **_module_kwargs(cfg), **kw)


register_family(
    Family(
        name="hopfield",
        make_block=_hopfield_block,
        block_keys=HOPFIELD_KEYS,
        description="modern Hopfield layers: causal retrieval from a ring buffer of earlier steps "
        "(+ Hopfield pooling for sequence classification)",
    )
)

register_preset(
    "hopfield-tiny",
    ModelConfig(
        family="hopfield", d_model=32, n_layers=2, vocab_size=64,
        block={"num_heads": 2, "memory_size": 32, "mlp_ratio": 2.0},
    ),
)
register_preset(
    "hopfield-125m",  # causal Hopfield LM sized like transformer-125m; 2048 stored patterns per layer
    ModelConfig(
        family="hopfield", d_model=768, n_layers=12, vocab_size=50304, tie_embeddings=True,
        block={"num_heads": 12, "memory_size": 2048, "mlp_ratio": 8 / 3},
    ),
)
register_preset(
    "hopfield-small",
    ModelConfig(
        family="hopfield", d_model=128, n_layers=3, vocab_size=256, head="classify", num_classes=10,
        block={"num_heads": 4, "memory_size": 2048, "pool_last": True, "pool_queries": 1},
    ),
)


# ----------------------------------------------------------------------------- hcam

from mnemax.layers.hcam import HCAMBlock  # noqa: E402

HCAM_KEYS = {
    "num_heads": 4,
    "chunk_size": 16,
    "num_chunks": 64,
    "top_k": 4,
    "key_size": None,
    "memory_position_encoding": True,
    "stop_gradient_memory": True,
    "persist_across_resets": False,
    "impl": "parallel",
    "mlp_ratio": 4.0,
    "mlp_kind": "swiglu",
    "norm": "rms",
}


def _hcam_block(cfg: ModelConfig, index: int, **kw) -> HCAMBlock:
    del index
    return HCAMBlock(features=cfg.d_model, **dict(cfg.block), **_module_kwargs(cfg), **kw)


register_family(
    Family(
        name="hcam",
        make_block=_hcam_block,
        block_keys=HCAM_KEYS,
        description="Transformer with Hierarchical Chunk Attention Memory: local attention in the "
        "current chunk + top-k chunk retrieval from a ring buffer of past chunks",
    )
)

register_preset(
    "hcam-tiny",
    ModelConfig(
        family="hcam", d_model=32, n_layers=2, vocab_size=64,
        block={"num_heads": 2, "chunk_size": 4, "num_chunks": 8, "top_k": 2, "mlp_ratio": 2.0},
    ),
)
register_preset(
    "hcam-125m",  # HCAM LM of ~125M parameters; 128 chunks of 16 steps (2048 tokens) of memory per layer
    ModelConfig(
        family="hcam", d_model=768, n_layers=8, vocab_size=50304, tie_embeddings=True,
        block={"num_heads": 12, "chunk_size": 16, "num_chunks": 128, "top_k": 8, "mlp_ratio": 8 / 3},
    ),
)
register_preset(
    "hcam-small",
    ModelConfig(
        family="hcam", d_model=256, n_layers=4, vocab_size=256,
        block={"num_heads": 4, "chunk_size": 16, "num_chunks": 64, "top_k": 4},
    ),
)


# ----------------------------------------------------------------------------- elm

from mnemax.layers.elm import ELMBlock  # noqa: E402

ELM_KEYS = {
    "neuron_model": False,
    "num_memory": None,
    "version": 1,
    "lambda_value": 5.0,
    "mlp_num_layers": 1,
    "tau_s_value": 5.0,
    "memory_tau_min": 1.0,
    "memory_tau_max": 1000.0,
    "learn_memory_tau": False,
    "num_branch": None,
    "num_synapse_per_branch": 1,
    "routing": None,
    "routing_seed": 0,
    "norm": "rms",
}


def _elm_block(cfg: ModelConfig, index: int, **kw) -> ELMBlock:
    del index
    b = {k: v for k, v in cfg.block.items() if k != "neuron_model"}
    b["num_memory"] = b["num_memory"] or cfg.d_model
    return ELMBlock(features=cfg.d_model, **b, **_module_kwargs(cfg), **kw)


def _elm_model(cfg: ModelConfig):
    if cfg.block.get("neuron_model"):
        from .neuron_model import NeuronModel

        return NeuronModel(cfg)
    from .model import SequenceModel

    return SequenceModel(cfg)


register_family(
    Family(
        name="elm",
        make_block=_elm_block,
        block_keys=ELM_KEYS,
        description="Expressive Leaky Memory neuron (v1/v2, Branch-ELM routing): one neuron as the model "
        "(neuron_model=True) or residual ELM layers in a stack",
        make_model=_elm_model,
    )
)

register_preset(
    "elm-tiny",
    ModelConfig(
        family="elm", d_model=8, n_layers=1, input_dim=6, head="classify", num_classes=4, final_norm="none",
        block={"neuron_model": True, "num_memory": 8, "num_branch": 3, "num_synapse_per_branch": 3, "routing": "random"},
    ),
)
register_preset(
    "elm-small",
    ModelConfig(
        family="elm", d_model=100, n_layers=1, input_dim=700, head="classify", num_classes=20, final_norm="none",
        block={"neuron_model": True, "num_memory": 100, "memory_tau_max": 1000.0},
    ),
)
register_preset(
    "branch-elm-small",
    ModelConfig(
        family="elm", d_model=100, n_layers=1, input_dim=700, head="classify", num_classes=20, final_norm="none",
        block={"neuron_model": True, "num_memory": 100, "version": 2, "num_branch": 64,
               "num_synapse_per_branch": 16, "routing": "random"},
    ),
)


# ----------------------------------------------------------------------------- xLSTM

from mnemax.layers.xlstm import XLSTMLargeBlock, XLSTMStack  # noqa: E402

XLSTM_KEYS = {
    "slstm_at": (),  # block indices of sLSTM blocks, or "all"
    "num_heads": 4,  # mLSTM heads
    "proj_factor": 2.0,
    "round_to": 64,  # the mLSTM inner width is proj_factor * d rounded to a multiple of this
    "round_mode": "up",  # ... up or down (layers/xlstm_widths.py)
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
    "ffn_round_to": 64,
    "ffn_round_mode": "up",
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
# The 7B layout at toy size (tests, notebooks): soft-capped gates and logits, RMSNorms.
register_preset(
    "xlstm-7b-tiny",
    ModelConfig(
        family="xlstm_large", d_model=64, n_layers=2, vocab_size=64, final_norm="rms", norm_eps=1e-6,
        logit_soft_cap=30.0, embed_init_std=_small_init_std(64), block={"num_heads": 2, "chunk_size": 8},
    ),
)


# ----------------------------------------------------------------------------- MemMamba

from . import presets_memmamba  # noqa: E402,F401  (registers the memmamba family and presets)
