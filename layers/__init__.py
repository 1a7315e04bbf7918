"""mnemax.layers: sequence mixers and shared pieces, all on one layer contract.

``y, state = layer(x, state=None, resets=None)`` with ``x: (batch, time, features)``
and ``layer.initial_state(batch_size)`` on the unbound module. See
:mod:`mnemax.layers.base`.
"""

from .attention import AttentionState, CausalSelfAttention, rope
from .base import check_resets, check_sequence, check_state, reset_state, state_dtype
from .conv import CausalConv1d, ConvState
from .memmamba import CrossLayerRead, MemMambaBlock, MemMambaStack, MemMambaState, NotePool
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
)
from .transformer import TransformerBlock

__all__ = [
    "AttentionState",
    "CausalConv1d",
    "CausalSelfAttention",
    "DiagonalSSM",
    "DiagonalSSMBlock",
    "DiagonalSSMState",
    "ConvState",
    "LSSL",
    "LSSLBlock",
    "LSSLState",
    "LayerNorm",
    "MLP",
    "CrossLayerRead",
    "MemMambaBlock",
    "MemMambaStack",
    "MemMambaState",
    "NotePool",
    "MambaBlock",
    "MambaMixer",
    "MambaState",
    "RMSNorm",
    "TransformerBlock",
    "check_resets",
    "check_sequence",
    "check_state",
    "layer_norm",
    "make_norm",
    "reset_state",
    "rms_norm",
    "rope",
    "state_dtype",
]
