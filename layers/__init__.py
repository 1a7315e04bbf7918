"""mnemax.layers: sequence mixers and shared pieces, all on one layer contract.

``y, state = layer(x, state=None, resets=None)`` with ``x: (batch, time, features)``
and ``layer.initial_state(batch_size)`` on the unbound module. See
:mod:`mnemax.layers.base`. The set-based Hopfield layers (``Hopfield``,
``HopfieldPooling``, ``HopfieldLayer``) keep their own signature (see
:mod:`mnemax.layers.hopfield`).
"""

from .attention import AttentionState, CausalSelfAttention, episode_positions, ring_buffer_update, rope
from .base import NO_WEIGHT_DECAY, check_resets, check_sequence, check_state, reset_state, state_dtype, weight_decay_mask
from .causal_hopfield import CausalHopfield, CausalHopfieldBlock, HopfieldPoolingBlock
from .conv import CausalConv1d, ConvState
from .delta_net import (
    DeltaNet,
    DeltaNetBlock,
    DeltaNetState,
    GatedDeltaNet,
    GatedDeltaNetBlock,
    GatedDeltaNetState,
    GatedRMSNorm,
)
from .hopfield import Hopfield, HopfieldLayer, HopfieldPooling, associate, hopfield_energy, hopfield_update
from .kimi_delta import KimiDeltaAttention, KimiDeltaAttentionBlock, KimiDeltaAttentionState
from .linear_attention import (
    GatedLinearAttention,
    GatedLinearAttentionBlock,
    GatedLinearAttentionState,
    LightningAttention,
    LightningAttentionBlock,
    LightningAttentionState,
    LinearAttentionBlock,
    MultiScaleRetention,
    MultiScaleRetentionBlock,
    MultiScaleRetentionState,
)
from .elm import ELMBlock, ELMNeuron, ELMState
from .hcam import HCAMAttention, HCAMBlock, HCAMState
from .mamba2 import Mamba2Block, Mamba2Mixer, Mamba2State
from .memmamba import CrossLayerRead, MemMambaBlock, MemMambaStack, MemMambaState
from .note_pool import NotePool
from .mlp import MLP
from .norms import LayerNorm, RMSNorm, layer_norm, make_norm, rms_norm
from .ssm import (
    LSSL,
    DiagonalSSM,
    DiagonalSSMBlock,
    DiagonalSSMState,
    LSSLBlock,
    LSSLState,
    MambaBlock,
    MambaMixer,
    MambaState,
    cache_discretized,
)
from .transformer import TransformerBlock
from .xlstm import MLSTMBlock, SLSTMBlock, XLSTMLargeBlock, XLSTMStack
from .xlstm_cells import MLSTMLargeLayer, MLSTMLayer, MLSTMLayerState, SLSTMLayer, SLSTMLayerState

__all__ = [
    "NO_WEIGHT_DECAY",
    "AttentionState",
    "CausalConv1d",
    "CausalHopfield",
    "CausalHopfieldBlock",
    "CausalSelfAttention",
    "ConvState",
    "CrossLayerRead",
    "DeltaNet",
    "DeltaNetBlock",
    "DeltaNetState",
    "DiagonalSSM",
    "DiagonalSSMBlock",
    "DiagonalSSMState",
    "ELMBlock",
    "ELMNeuron",
    "ELMState",
    "GatedDeltaNet",
    "GatedDeltaNetBlock",
    "GatedDeltaNetState",
    "GatedLinearAttention",
    "GatedLinearAttentionBlock",
    "GatedLinearAttentionState",
    "GatedRMSNorm",
    "HCAMAttention",
    "HCAMBlock",
    "HCAMState",
    "Hopfield",
    "HopfieldLayer",
    "HopfieldPooling",
    "HopfieldPoolingBlock",
    "KimiDeltaAttention",
    "KimiDeltaAttentionBlock",
    "KimiDeltaAttentionState",
    "LSSL",
    "LSSLBlock",
    "LSSLState",
    "LayerNorm",
    "LightningAttention",
    "LightningAttentionBlock",
    "LightningAttentionState",
    "LinearAttentionBlock",
    "MLP",
    "MLSTMBlock",
    "MLSTMLargeLayer",
    "MLSTMLayer",
    "MLSTMLayerState",
    "Mamba2Block",
    "Mamba2Mixer",
    "Mamba2State",
    "MambaBlock",
    "MambaMixer",
    "MambaState",
    "MemMambaBlock",
    "MemMambaStack",
    "MemMambaState",
    "MultiScaleRetention",
    "MultiScaleRetentionBlock",
    "MultiScaleRetentionState",
    "NotePool",
    "RMSNorm",
    "SLSTMBlock",
    "SLSTMLayer",
    "SLSTMLayerState",
    "TransformerBlock",
    "XLSTMLargeBlock",
    "XLSTMStack",
    "associate",
    "cache_discretized",
    "check_resets",
    "check_sequence",
    "check_state",
    "episode_positions",
    "hopfield_energy",
    "hopfield_update",
    "layer_norm",
    "make_norm",
    "reset_state",
    "ring_buffer_update",
    "rms_norm",
    "rope",
    "state_dtype",
    "weight_decay_mask",
]
