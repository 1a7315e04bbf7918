"""A single (Branch-)ELM neuron as the whole model: the ELM paper's setting.

The inputs (spike channels, or one-hot tokens when ``vocab_size`` is set) go straight
to the neuron's synapses, with no input projection (its routing and non-negative
synaptic weights are meant for the raw channels), and the neuron's output layer
``W_y`` is the head::

    outputs, state = NeuronModel(config)(inputs, state=None, resets=None)
    inputs: (batch, time, input_dim) floats, or (batch, time) int tokens
    outputs: (batch, time, config.outputs) float32 -- per-step logits/regression;
      with pool="mean" each step's output is the running mean over the episode
    state: ModelState(blocks=(ELMState,), pool=PoolState or ())

Used by the "elm" family when its block option ``neuron_model`` is True (the memory
size is ``num_memory``, or ``d_model`` when that is None); ``n_layers`` must be 1 and
``final_norm``, ``tie_embeddings``, ``embed_init_std`` do not apply.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.kernels.sharding import KernelSharding
from mnemax.layers.base import check_resets, check_state, expected_state, state_dtype
from mnemax.layers.elm import ELMNeuron

from .config import ModelConfig
from .model import ModelState, PoolState, running_mean


class NeuronModel(nn.Module):
    """Attributes: ``config`` (an ``elm`` family config with ``neuron_model=True``) and
    ``kernel_sharding`` (handed to the neuron's ``linear_scan``; see ``mnemax.build``)."""

    config: ModelConfig
    kernel_sharding: KernelSharding | None = None

    def _neuron(self, **kw) -> ELMNeuron:
        cfg = self.config
        if cfg.n_layers != 1:
            raise ValueError(f"a single-neuron model needs n_layers = 1, got {cfg.n_layers}")
        opts = cfg.block.options_for(ELMNeuron)
        opts["num_memory"] = opts.get("num_memory") or cfg.d_model
        opts["kernel_sharding"] = self.kernel_sharding
        return ELMNeuron(
            num_input=cfg.input_dim or cfg.vocab_size,
            num_output=cfg.outputs,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            **opts,
            **kw,
        )

    def initial_state(self, batch_size: int) -> ModelState:
        cfg = self.config
        pool: PoolState | tuple = ()
        if cfg.head == "classify" and cfg.pool == "mean":
            sdt = state_dtype(cfg.dtype)
            pool = PoolState(jnp.zeros((batch_size, cfg.outputs), sdt), jnp.zeros((batch_size,), sdt))
        return ModelState(blocks=(self._neuron(parent=None).initial_state(batch_size),), pool=pool)

    @nn.compact
    def __call__(self, inputs, state: ModelState | None = None, resets=None):
        cfg = self.config
        shape = getattr(inputs, "shape", None)
        if cfg.vocab_size is not None:
            if shape is None or len(shape) != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
                raise ValueError(f"inputs must be int tokens of shape (batch, time), got shape {shape}")
            x = jax.nn.one_hot(inputs, cfg.vocab_size, dtype=jnp.dtype(cfg.dtype))
        else:
            if shape is None or len(shape) != 3 or shape[-1] != cfg.input_dim:
                raise ValueError(f"inputs must have shape (batch, time, {cfg.input_dim}), got shape {shape}")
            x = inputs.astype(jnp.dtype(cfg.dtype))
        batch, time = x.shape[:2]
        resets = check_resets(resets, batch, time)
        if state is not None:
            check_state(state, expected_state(self, batch))
        y, s = self._neuron(name="neuron")(x, None if state is None else state.blocks[0], resets)
        y = y.astype(jnp.promote_types(jnp.dtype(cfg.dtype), jnp.float32))
        pool: PoolState | tuple = ()
        if cfg.head == "classify" and cfg.pool == "mean":
            y, pool = running_mean(y, None if state is None else state.pool, resets, cfg.dtype)
        if cfg.logit_soft_cap is not None:
            y = cfg.logit_soft_cap * jnp.tanh(y / cfg.logit_soft_cap)
        return y, ModelState(blocks=(s,), pool=pool)
