"""The generic zoo model: ``embed (or input projection) -> blocks -> norm -> head``.

It follows the layer contract, so generation, streaming and truncated BPTT use the
same call::

    outputs, state = model(inputs, state=None, resets=None)
    state0 = model.initial_state(batch_size)

Shapes:
  inputs: (batch, time) int tokens when ``config.vocab_size`` is set, else
    (batch, time, input_dim) floats.
  outputs: (batch, time, config.outputs) float32 (float64 for a float64 model) --
    next-token logits ("lm"),
    per-step class logits ("classify": the last step's are the sequence's; with
    ``pool="mean"`` each step sees the running mean of the features so far), or
    per-step regression outputs ("regress").
  state: ModelState(blocks=tuple of each block's state (with scan_layers: one state
    pytree stacked on a leading layer axis, or for a repeating group of P different
    blocks a tuple of P such pytrees stacked over the n_layers / P groups, entry j
    of group g being layer g * P + j), pool=PoolState or ()).

Per-layer outputs: every call sows the residual stream after the embedding and after
each block into the "intermediates" collection as ``layer_outputs`` (a tuple of
n_layers + 1 arrays (batch, time, d_model)); read them with
``model.apply(variables, inputs, mutable=["intermediates"])`` or
:func:`mnemax.diagnostics.layer_outputs`. Without ``mutable`` the sow is a no-op. With
``scan_layers`` only the embedding output is sown (the blocks run inside ``nn.scan``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.kernels import linear_scan
from mnemax.kernels.sharding import KernelSharding
from mnemax.layers.base import check_resets, check_state, check_token_ids, expected_state, partitioned, state_dtype
from mnemax.layers.norms import make_norm

from .config import FrozenDict, ModelConfig
from .registry import Family, get_family
from .sharding import constrain_rows


class PoolState(NamedTuple):
    total: jax.Array  # (batch, d_model) running sum of features in the current episode
    count: jax.Array  # (batch,) number of steps in it


class ModelState(NamedTuple):
    blocks: tuple
    pool: PoolState | tuple


class SequenceModel(nn.Module):
    """The zoo model (module docstring).

    Attributes:
      config: the model's :class:`ModelConfig`.
      family: its registered :class:`~mnemax.registry.Family` (what builds the blocks);
        None looks it up once, when the model is constructed (``mnemax.build`` passes it).
      kernel_sharding: the mesh axes splitting the Pallas kernels' batch and heads, handed
        to every block's mixer that has a ``kernel_sharding`` field (None: none).
    """

    config: ModelConfig
    family: Family | None = None
    kernel_sharding: KernelSharding | None = None

    def __post_init__(self):
        if self.family is None:
            object.__setattr__(self, "family", get_family(self.config.family))
        elif self.family.name != self.config.family:
            raise ValueError(f"family {self.family.name!r} does not build config.family {self.config.family!r}")
        super().__post_init__()

    def block_template(self, index: int) -> nn.Module:
        """Block ``index``, unbound, with the kernel sharding set on its mixer."""
        return with_kernel_sharding(self.family.make_block(self.config, index), self.kernel_sharding)

    def _blocks(self) -> list:
        return [self.block_template(i) for i in range(self.config.n_layers)]

    def initial_state(self, batch_size: int) -> ModelState:
        cfg = self.config
        if cfg.scan_layers:
            protos = self._scan_group()
            groups = cfg.n_layers // len(protos)
            stack = lambda one: jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (groups,) + leaf.shape), one)  # noqa: E731
            blocks = [stack(b.initial_state(batch_size)) for b in protos]
            blocks = blocks[0] if len(protos) == 1 else tuple(blocks)
        else:
            blocks = tuple(b.initial_state(batch_size) for b in self._blocks())
        pool: PoolState | tuple = ()
        if cfg.head == "classify" and cfg.pool == "mean":
            sdt = state_dtype(cfg.dtype)
            pool = PoolState(jnp.zeros((batch_size, cfg.d_model), sdt), jnp.zeros((batch_size,), sdt))
        return ModelState(blocks=blocks, pool=pool)

    def _scan_group(self) -> list:
        """The blocks of one scanned group: the shortest period ``P`` (dividing n_layers)
        with block ``i + P`` identical to block ``i`` for every ``i`` -- one block when all
        are identical, e.g. the first 8 for an xLSTM stack with an sLSTM block every 8th."""
        blocks = self._blocks()
        # block_index (the sLSTM forget-bias init's depth) is set per layer inside the scan
        key = [at_depth(b, 0) for b in blocks]
        n = len(blocks)
        for period in range(1, n + 1):
            if n % period == 0 and all(key[i] == key[i % period] for i in range(n)):
                break
        if period == n and n > 1:
            kinds = [type(b).__name__ for b in blocks]
            raise ValueError(
                f"scan_layers=True needs the blocks of family {self.config.family!r} to repeat with a period dividing "
                f"n_layers={n} (got the pattern {kinds}); set scan_layers=False"
            )
        return blocks[:period]

    def _check_inputs(self, inputs):
        cfg = self.config
        shape = getattr(inputs, "shape", None)
        if cfg.vocab_size is not None:
            if shape is None or len(shape) != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
                raise ValueError(
                    f"inputs must be int tokens of shape (batch, time), got shape {shape} "
                    f"dtype {getattr(inputs, 'dtype', None)}"
                )
            check_token_ids(inputs, cfg.vocab_size)
        elif shape is None or len(shape) != 3 or shape[-1] != cfg.input_dim:
            raise ValueError(f"inputs must have shape (batch, time, {cfg.input_dim}), got shape {shape}")
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"inputs must have at least one row and one time step, got shape {tuple(shape)}")

    @nn.compact
    def __call__(self, inputs, state: ModelState | None = None, resets=None):
        cfg = self.config
        self._check_inputs(inputs)
        batch, time = inputs.shape[:2]
        resets = check_resets(resets, batch, time)
        if state is not None:
            check_state(state, expected_state(self, batch))
        dt = jnp.dtype(cfg.dtype)
        pdt = jnp.dtype(cfg.param_dtype)
        residual_dt = jnp.promote_types(dt, jnp.float32)

        embed = None
        if cfg.vocab_size is not None:
            embed = nn.Embed(
                cfg.vocab_size,
                cfg.d_model,
                embedding_init=partitioned(nn.initializers.normal(cfg.embed_init_std), ("vocab", "embed")),
                dtype=dt,
                param_dtype=pdt,
                name="embed",
            )
            x = embed(inputs)
        else:
            x = nn.Dense(
                cfg.d_model,
                dtype=dt,
                param_dtype=pdt,
                kernel_init=partitioned(nn.initializers.lecun_normal(), ("input", "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)),
                name="input_proj",
            )(inputs.astype(dt))
        x = constrain_rows(x.astype(residual_dt))

        self.sow("intermediates", "layer_outputs", x)
        x, new_states = self._run_blocks(x, None if state is None else state.blocks, resets, residual_dt)

        if cfg.final_norm == "none":
            h = x.astype(dt)
        else:
            kind, extra = ("layer", {"use_bias": False}) if cfg.final_norm == "layer_nobias" else (cfg.final_norm, {})
            h, _ = make_norm(kind, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, name="final_norm", **extra)(x)

        pool_state: PoolState | tuple = ()
        if cfg.head == "classify" and cfg.pool == "mean":
            h, pool_state = running_mean(h, None if state is None else state.pool, resets, cfg.dtype)

        if cfg.head == "lm" and cfg.tie_embeddings:
            out = embed.attend(h.astype(dt))
        else:
            out = nn.Dense(
                cfg.outputs,
                use_bias=cfg.head != "lm",
                dtype=dt,
                param_dtype=pdt,
                kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", "vocab" if cfg.head == "lm" else "output")),
                bias_init=partitioned(nn.initializers.zeros, ("output",)),
                name="head",
            )(h)
        out = out.astype(residual_dt)
        if cfg.logit_soft_cap is not None:
            out = cfg.logit_soft_cap * jnp.tanh(out / cfg.logit_soft_cap)
        return out, ModelState(blocks=new_states, pool=pool_state)

    def _run_blocks(self, x, block_states, resets, residual_dt):
        """The blocks, in order (a family's ``make_model`` may subclass and replace this).
        Each block's output is cast to ``residual_dt`` and sown as an "intermediates"
        ``layer_outputs`` entry. Returns (x, tuple of the blocks' new states)."""
        cfg = self.config
        if cfg.scan_layers:
            protos = self._scan_group()
            stacked = self.initial_state(x.shape[0]).blocks if block_states is None else block_states
            scanned = nn.scan(
                _ScanStep,
                variable_axes={"params": 0, "discretized": 0},  # per-layer caches (LSSL's cache_discretized)
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, 0),
                length=cfg.n_layers // len(protos),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, new = scanned(
                block_cls=tuple(type(b) for b in protos), block_fields=tuple(FrozenDict(module_fields(b)) for b in protos),
                remat=cfg.remat, remat_policy=cfg.remat_policy, residual_dtype=jnp.dtype(residual_dt).name, name="blocks",
            )(x, stacked if len(protos) > 1 else (stacked,), resets, jnp.arange(cfg.n_layers // len(protos)))
            # nn.scan returns NamedTuple states as plain tuples: restore the structure
            return x, jax.tree.unflatten(jax.tree.structure(stacked), jax.tree.leaves(new))
        new_states = []
        for i in range(cfg.n_layers):
            proto = self.block_template(i)
            cls = remat_block(type(proto), cfg.remat_policy) if cfg.remat else type(proto)
            block = cls(**module_fields(proto), name=f"block_{i}")
            x, s = block(x, None if block_states is None else block_states[i], resets)
            x = constrain_rows(x.astype(residual_dt))
            self.sow("intermediates", "layer_outputs", x)
            new_states.append(s)
        return x, tuple(new_states)


class _ScanStep(nn.Module):
    """One group of layers inside ``nn.scan`` (one layer when all blocks are identical):
    carry the residual stream, scan over the stacked states (a tuple, one per block of
    the group). The parameters are ``block`` for a one-block group, else ``block_0`` ...
    A ``block_index`` field of a block or its mixer (it only shapes an init) becomes its
    layer's index, ``group * P + j``, traced from the scanned ``group``."""

    block_cls: tuple
    block_fields: tuple
    remat: bool = False
    remat_policy: str = "nothing"
    residual_dtype: str = "float32"

    @nn.compact
    def __call__(self, x, states, resets, group):
        new = []
        one = len(self.block_cls) == 1
        for j, (block_cls, fields) in enumerate(zip(self.block_cls, self.block_fields)):
            cls = remat_block(block_cls, self.remat_policy) if self.remat else block_cls
            fields = module_fields(at_depth(block_cls(**fields, parent=None), group * len(self.block_cls) + j))
            y, s = cls(**fields, name="block" if one else f"block_{j}")(x, states[j], resets)
            x = constrain_rows(y.astype(self.residual_dtype))
            new.append(s)
        return x, new[0] if one else tuple(new)


def remat_block(block_cls, policy: str):
    """``block_cls`` rematerialised in the backward pass, keeping what ``policy`` (one of
    :data:`~mnemax.zoo.config.REMAT_POLICIES`, see ``ModelConfig.remat_policy``) names."""
    policies = {
        "nothing": None,  # nn.remat's default: recompute everything
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "dots_all": jax.checkpoint_policies.dots_saveable,
    }
    if policy not in policies:
        raise ValueError(f"remat_policy must be one of {tuple(policies)}, got {policy!r}")
    return nn.remat(block_cls, policy=policies[policy])


def module_fields(module: nn.Module) -> dict:
    """The dataclass fields of an unbound module (to rebuild it, e.g. under ``nn.remat``)."""
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}


def _replace_in(module: nn.Module, field: str, value) -> nn.Module:
    """``module`` (unbound) with ``field`` set to ``value`` where it or one of its
    module-valued fields (a block's mixer), recursively, has that field."""
    changes = {}
    for f in dataclasses.fields(module):
        current = getattr(module, f.name)
        if f.name == field:
            changes[f.name] = value
        elif isinstance(current, nn.Module):
            new = _replace_in(current, field, value)
            if new is not current:
                changes[f.name] = new
    return module.clone(**changes) if changes else module


def at_depth(block: nn.Module, index) -> nn.Module:
    """``block`` as layer ``index`` (an int, or traced inside a scan): its own and its
    mixer's ``block_index`` (the sLSTM forget-bias init's depth) set to ``index``."""
    return _replace_in(block, "block_index", index)


def with_kernel_sharding(block: nn.Module, sharding: KernelSharding | None) -> nn.Module:
    """``block`` with ``sharding`` as the ``kernel_sharding`` of every part that has that field
    (its mixer, a sub-layer); None leaves the block as it is."""
    return block if sharding is None else _replace_in(block, "kernel_sharding", sharding)


def running_mean(h, pool: PoolState | None, resets, dtype):
    """Causal running mean over the current episode of ``h`` (batch, time, d), the state
    (``pool``: running sum and count) in the state dtype of ``dtype``. Returns (means of
    h's dtype, PoolState after the last step)."""
    batch, time, d = h.shape
    sdt = state_dtype(dtype)
    if pool is None:
        pool = PoolState(jnp.zeros((batch, d), sdt), jnp.zeros((batch,), sdt))
    h32 = h.astype(sdt)
    ones = jnp.ones((batch, time, 1), sdt)
    # sums and counts are linear scans with a = 1, cut at resets.
    both = jnp.concatenate([h32, ones], axis=-1)
    h0 = jnp.concatenate([pool.total, pool.count[:, None]], axis=-1)
    # the xla backend: a memory-bound running sum that XLA partitions itself under any mesh (a
    # Pallas backend would need a KernelSharding, and d + 1 channels rarely split over a heads axis)
    acc = linear_scan(jnp.ones((), sdt), both, h0=h0, resets=resets, backend="xla")
    total, count = acc[..., :d], acc[..., d]
    mean = total / count[..., None]
    return mean.astype(h.dtype), PoolState(total[:, -1], count[:, -1])
