"""The ``memmamba`` family: its block options, the zoo model (unscanned, or scanned in groups
of ``cross_layer_every`` layers) and presets. The layers are in :mod:`mnemax.layers.memmamba`."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mnemax.layers import memmamba as memmamba_layers
from mnemax.layers.base import state_dtype
from mnemax.layers.memmamba import (
    FUSIONS,
    GATES,
    POOL_IMPLS,
    REPLACE,
    CrossLayerRead,
    MemMambaBlock,
    cross_layer_read,
    run_layers,
)
from mnemax.layers.note_pool import chunk_split, empty_pool

from ..config import FrozenDict, ModelConfig
from ..model import SequenceModel, module_fields
from ..registry import Family, register_family, register_preset
from .common import layer_default
from .mamba import MambaConfig, mamba_mixer


@dataclasses.dataclass(frozen=True)
class MemMambaConfig(MambaConfig):
    """Block options of the ``memmamba`` family: the Mamba family's, the pool's (see
    :class:`MemMambaBlock`) and the stack's ``cross_layer_every`` and ``cross_layer_pools``."""

    pool_size: int = layer_default(MemMambaBlock, "pool_size")
    pool_dim: int = layer_default(MemMambaBlock, "pool_dim")
    num_heads: int = layer_default(MemMambaBlock, "num_heads")
    note_threshold: float = layer_default(MemMambaBlock, "note_threshold")
    read_threshold: float = layer_default(MemMambaBlock, "read_threshold")
    note_gate: str = layer_default(MemMambaBlock, "note_gate")
    read_gate: str = layer_default(MemMambaBlock, "read_gate")
    gate_temperature: float = layer_default(MemMambaBlock, "gate_temperature")
    replace: str = layer_default(MemMambaBlock, "replace")
    score_hidden: int = layer_default(MemMambaBlock, "score_hidden")
    fusion: str = layer_default(MemMambaBlock, "fusion")
    read_bias_init: float = layer_default(MemMambaBlock, "read_bias_init")
    read_init_scale: float = layer_default(MemMambaBlock, "read_init_scale")
    pool_chunk: int = layer_default(MemMambaBlock, "pool_chunk")
    pool_impl: str = layer_default(MemMambaBlock, "pool_impl")
    cross_layer_every: int = 4
    cross_layer_pools: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.check_int("pool_size", "pool_dim", "num_heads", "pool_chunk")
        if self.pool_dim % self.num_heads:
            self.reject("pool_dim", f"divisible by num_heads ({self.num_heads})")
        self.check_number("gate_temperature")
        self.check_number("read_init_scale", positive=False)
        self.check_choice("note_gate", GATES)
        self.check_choice("read_gate", GATES)
        self.check_choice("replace", REPLACE)
        self.check_choice("fusion", FUSIONS)
        self.check_choice("pool_impl", POOL_IMPLS)
        self.check_int("score_hidden", "cross_layer_every", "cross_layer_pools", low=0)


def make_block(config: ModelConfig, index: int) -> MemMambaBlock:
    del index
    return MemMambaBlock(
        mixer=mamba_mixer(config), **config.block.options_for(MemMambaBlock, exclude=("mixer",)), parent=None
    )


class _MemMambaLayer(nn.Module):
    """One layer of a scanned MemMamba group (``block``), scanned over the group's ``every``
    layers: runs the block on the residual stream, records its chunk-start pools in the
    history at its layer index (``group * every + j``) and casts its output to the residual
    dtype. One traced (and one compiled) block per group instead of ``every``."""

    block_fields: FrozenDict
    every: int
    remat: bool = False
    residual_dtype: str = "float32"

    @nn.compact
    def __call__(self, carry, xs, group, resets):
        x, hist = carry
        state, j = xs
        cls = nn.remat(MemMambaBlock, methods=["forward"]) if self.remat else MemMambaBlock
        x, state, _, history = cls(**self.block_fields, name="block").forward(x, state, resets)
        hist = jax.tree.map(lambda buf, h: lax.dynamic_update_index_in_dim(buf, h.astype(buf.dtype), group * self.every + j, 0),
                            hist, history[0])
        return (x.astype(self.residual_dtype), hist), state


class _MemMambaGroup(nn.Module):
    """One scanned group of the MemMamba stack: ``every`` layers (``layers/block``, an inner
    scan), then the cross-layer read (``cross``) of the group's last layer. The carry holds
    the residual stream and every layer's pools at each chunk's start (``(n_layers,
    n_chunks, ...)``, empty for layers not run yet); the read masks the layers it must not
    see (itself, the later ones, and those beyond ``span``) by their count, which reads
    exactly nothing."""

    block_fields: FrozenDict
    cross_fields: FrozenDict
    every: int
    span: int
    n_layers: int
    remat: bool = False
    residual_dtype: str = "float32"

    @nn.compact
    def __call__(self, carry, xs, resets):
        states, group = xs
        layers = nn.scan(
            _MemMambaLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=self.every,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        (x, hist), new = layers(block_fields=self.block_fields, every=self.every, remat=self.remat,
                                residual_dtype=self.residual_dtype, name="layers")(
            carry, (states, jnp.arange(self.every)), group, resets)
        layer = group * self.every + self.every - 1
        idx = jnp.arange(self.n_layers)
        seen = idx < layer
        if self.span > 0:
            seen = seen & (idx >= layer - self.span)
        masked = hist._replace(count=jnp.where(seen[:, None, None], hist.count, 0))
        pools = [jax.tree.map(lambda a, k=k: a[k], masked) for k in range(self.n_layers)]
        x = CrossLayerRead(**self.cross_fields, name="cross")(x, [(p, None, (p,)) for p in pools], resets)
        x = x.astype(self.residual_dtype)
        return (x, hist), new


class MemMambaModel(SequenceModel):
    """The zoo model of the ``memmamba`` family: :class:`SequenceModel` (embedding, final
    norm, heads, state, ``layer_outputs``) with the MemMamba stack as its blocks, i.e.
    cross-layer attention (``cross_layer_<l>``) after every ``cross_layer_every``-th block.
    The parameters of the Mamba parts have the names of the ``mamba`` family's.

    ``scan_layers=True``: the stack runs as ``nn.scan`` over groups of ``cross_layer_every``
    layers (``blocks/layers/block`` stacked over (groups, layers of a group) by an inner scan,
    so the Pallas kernels appear once in the compiled step; ``blocks/cross`` stacked over
    groups; the state is the per-layer states stacked, as for the other families), so one
    group is traced and compiled instead of every layer. The same function: each
    cross-layer read attends to all layers' recorded pools with the ones it must not see
    masked out. Needs the chunked pool path and ``n_layers`` a multiple of
    ``cross_layer_every`` >= 2."""

    def _run_scanned(self, x, block_states, resets, residual_dt):
        cfg = self.config
        every, span, n = cfg.block.cross_layer_every, cfg.block.cross_layer_pools, cfg.n_layers
        proto = self.block_template(0)
        if every < 2 or n % every or proto.pool_impl != "chunked" or not memmamba_layers.CROSS_READ_FROM_HISTORY:
            raise ValueError(
                f"scan_layers=True for memmamba needs cross_layer_every >= 2 dividing n_layers and pool_impl='chunked'; "
                f"got cross_layer_every={every}, n_layers={n}, pool_impl={proto.pool_impl!r}; set scan_layers=False"
            )
        batch, time = x.shape[:2]
        groups = n // every
        states = self.initial_state(batch).blocks if block_states is None else block_states
        states = jax.tree.map(lambda a: a.reshape((groups, every) + a.shape[1:]), states)
        n_chunks = chunk_split(batch, time, proto.pool_chunk)[1]
        pool = empty_pool(batch, proto.pool_size, proto.pool_dim, state_dtype(cfg.dtype))
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
            block_fields=FrozenDict(module_fields(proto)),
            cross_fields=FrozenDict(module_fields(cross_layer_read(proto, parent=None))),
            every=every, span=span, n_layers=n, remat=cfg.remat, residual_dtype=jnp.dtype(residual_dt).name,
            name="blocks",
        )((x, hist), (states, jnp.arange(groups)), resets)
        return x, jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), new)

    def _run_blocks(self, x, block_states, resets, residual_dt):
        cfg = self.config
        if cfg.scan_layers:
            return self._run_scanned(x, block_states, resets, residual_dt)
        proto = self.block_template(0)
        cls = nn.remat(type(proto), methods=["forward"]) if cfg.remat else type(proto)

        def after_layer(x):
            x = x.astype(residual_dt)
            self.sow("intermediates", "layer_outputs", x)
            return x

        x, states, _ = run_layers(
            x, block_states, resets,
            lambda l: cls(**module_fields(self.block_template(l)), name=f"block_{l}"),
            lambda l: cross_layer_read(proto, name=f"cross_layer_{l}"),
            cfg.n_layers, cfg.block.cross_layer_every, cfg.block.cross_layer_pools, after_layer,
        )
        return x, states


FAMILY = register_family(
    Family(
        name="memmamba",
        config=MemMambaConfig,
        make_block=make_block,
        make_model=MemMambaModel,
        description="MemMamba: Mamba blocks + Note Block state pool, cross-token and sparse cross-layer attention",
    )
)

register_preset(
    "memmamba-tiny",
    ModelConfig(
        family="memmamba", d_model=32, n_layers=2, vocab_size=64, tie_embeddings=True, norm_eps=1e-5,
        block=MemMambaConfig(d_state=8, pool_size=16, pool_dim=16, num_heads=2, cross_layer_every=2),
    ),
)
register_preset(
    "memmamba-130m",  # the mamba-130m backbone; 50-slot pools of 64-d notes, cross-layer reads every 4 layers
    ModelConfig(
        family="memmamba", d_model=768, n_layers=24, vocab_size=50280, tie_embeddings=True, norm_eps=1e-5,
        block=MemMambaConfig(d_state=16, d_conv=4, expand=2, pool_size=50, pool_dim=64, num_heads=4, cross_layer_every=4),
    ),
)
