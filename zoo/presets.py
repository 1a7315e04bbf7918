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


# ----------------------------------------------------------------------------- MemMamba

import flax.linen as nn  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from mnemax.layers import memmamba as _mm  # noqa: E402
from mnemax.layers.base import state_dtype  # noqa: E402
from mnemax.layers.mamba import mixer_fields  # noqa: E402
from mnemax.layers.memmamba import CrossLayerRead, MemMambaBlock, run_layers  # noqa: E402

from .config import FrozenDict  # noqa: E402
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


class _MemMambaGroup(nn.Module):
    """One scanned group of the MemMamba stack: ``every`` layers (``block_<j>``), then the
    cross-layer read (``cross``) of the group's last layer. The carry holds the residual
    stream and every layer's pools at each chunk's start (``(n_layers, n_chunks, ...)``,
    empty for layers not run yet); the read masks the layers it must not see (itself, the
    later ones, and those beyond ``span``) by their count, which reads exactly nothing."""

    block_fields: FrozenDict
    cross_fields: FrozenDict
    every: int
    span: int
    n_layers: int
    remat: bool = False
    residual_dtype: str = "float32"

    @nn.compact
    def __call__(self, carry, xs, resets):
        x, hist = carry
        states, group = xs
        cls = nn.remat(MemMambaBlock, methods=["forward"]) if self.remat else MemMambaBlock
        new = []
        for j in range(self.every):
            layer = group * self.every + j
            x, state, _, history = cls(**self.block_fields, name=f"block_{j}").forward(
                x, jax.tree.map(lambda a: a[j], states), resets)
            hist = jax.tree.map(lambda buf, h: lax.dynamic_update_index_in_dim(buf, h.astype(buf.dtype), layer, 0),
                                hist, history[0])
            new.append(state)
            if j < self.every - 1:
                x = x.astype(self.residual_dtype)
        idx = jnp.arange(self.n_layers)
        seen = idx < layer
        if self.span > 0:
            seen = seen & (idx >= layer - self.span)
        masked = hist._replace(count=jnp.where(seen[:, None, None], hist.count, 0))
        pools = [jax.tree.map(lambda a, k=k: a[k], masked) for k in range(self.n_layers)]
        x = CrossLayerRead(**self.cross_fields, name="cross")(x, [(p, None, (p,)) for p in pools], resets)
        x = x.astype(self.residual_dtype)
        return (x, hist), jax.tree.map(lambda *a: jnp.stack(a), *new)


class MemMambaModel(SequenceModel):
    """The zoo model of the ``memmamba`` family: :class:`SequenceModel` (embedding, final
    norm, heads, state, ``layer_outputs``) with the MemMamba stack as its blocks, i.e.
    cross-layer attention (``cross_layer_<l>``) after every ``cross_layer_every``-th block.
    The parameters of the Mamba parts have the names of the ``mamba`` family's.

    ``scan_layers=True``: the stack runs as ``nn.scan`` over groups of ``cross_layer_every``
    layers (``blocks/block_<j>``, ``blocks/cross``, stacked over groups; the state is the
    per-layer states stacked, as for the other families), so one group is traced and
    compiled instead of every layer. The same function: each cross-layer read attends to
    all layers' recorded pools with the ones it must not see masked out. Needs the chunked
    pool path and ``n_layers`` a multiple of ``cross_layer_every`` >= 2."""

    def _run_scanned(self, x, block_states, resets, residual_dt):
        cfg = self.config
        every, span, n = cfg.block["cross_layer_every"], cfg.block["cross_layer_pools"], cfg.n_layers
        proto = _memmamba_block(cfg, 0, parent=None)
        if every < 2 or n % every or proto.pool_impl != "chunked" or not _mm.CROSS_READ_FROM_HISTORY:
            raise ValueError(
                f"scan_layers=True for memmamba needs cross_layer_every >= 2 dividing n_layers and pool_impl='chunked'; "
                f"got cross_layer_every={every}, n_layers={n}, pool_impl={proto.pool_impl!r}; set scan_layers=False"
            )
        batch, time = x.shape[:2]
        groups = n // every
        states = self.initial_state(batch).blocks if block_states is None else block_states
        states = jax.tree.map(lambda a: a.reshape((groups, every) + a.shape[1:]), states)
        n_chunks = _mm._chunk_split(batch, time, proto.pool_chunk)[1]
        pool = _mm.empty_pool(batch, proto.pool_size, proto.pool_dim, state_dtype(cfg.dtype))
        hist = jax.tree.map(lambda a: jnp.zeros((n, n_chunks) + a.shape, a.dtype), pool)
        scanned = nn.scan(
            _MemMambaGroup,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=groups,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        (x, _), new = scanned(
            block_fields=FrozenDict(_fields(proto)), cross_fields=FrozenDict(mixer_fields(proto, CrossLayerRead)),
            every=every, span=span, n_layers=n, remat=cfg.remat, residual_dtype=jnp.dtype(residual_dt).name,
            name="blocks",
        )((x, hist), (states, jnp.arange(groups)), resets)
        return x, jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), new)

    def _run_blocks(self, x, block_states, resets, residual_dt):
        cfg = self.config
        if cfg.scan_layers:
            return self._run_scanned(x, block_states, resets, residual_dt)
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
