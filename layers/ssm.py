"""The state-space family: LSSL (HiPPO), the diagonal SSM (S4D) and Mamba.

The layers live in :mod:`~mnemax.layers.lssl`, :mod:`~mnemax.layers.s4d` and
:mod:`~mnemax.layers.mamba` (see their docstrings for the equations); this module
gathers them and adds the residual blocks the zoo stacks::

    LSSLBlock / DiagonalSSMBlock:  x = x + Mixer(Norm(x));  x = x + MLP(Norm(x)) if mlp_ratio > 0
    MambaBlock:                    x = x + MambaMixer(RMSNorm(x))   (residual in float32)

A block holds its mixer (``mixer``: the unbound layer, whose parameters and state are
the block's) plus ``norm`` ("layer" or "rms"), ``norm_eps``, ``mlp_ratio`` and
``mlp_kind`` (Mamba's block: ``norm_eps`` and ``residual_in_fp32``)::

    LSSLBlock(mixer=LSSL(features=64, state_size=32), mlp_ratio=2.0)

Logical axis names: 'embed' (model width, also the H features of LSSL/S4D), 'mlp'
(Mamba's inner channels), 'conv' (conv taps) and 'state' (the SSM state dimension).
"""

from __future__ import annotations

import flax.linen as nn

from .base import check_sequence
from .lssl import (
    LSSL,
    LSSLState,
    cache_discretized,
    causal_fft_conv,
    discretize,
    hippo,
    krylov,
    legendre_basis,
    legs_memory,
    reconstruct,
)
from .mamba import MambaBlock, MambaMixer, MambaState
from .mlp import MLP
from .norms import make_norm
from .s4d import DiagonalSSM, DiagonalSSMState


def _residual_block(block, x, state, resets):
    """Pre-norm residual around ``block.mixer``, then an optional pre-norm MLP; the norms
    and the MLP run in the mixer's dtypes. Called inside the block's compact ``__call__``."""
    check_sequence(x, block.features, name="x")
    kw = dict(dtype=block.mixer.dtype, param_dtype=block.mixer.param_dtype)
    h, _ = make_norm(block.norm, eps=block.norm_eps, name="norm", **kw)(x)
    h, state = block.mixer(h, state, resets)
    x = x + h.astype(x.dtype)
    if block.mlp_ratio > 0:
        h, _ = make_norm(block.norm, eps=block.norm_eps, name="mlp_norm", **kw)(x)
        hidden = int(round(block.mlp_ratio * block.features))
        h, _ = MLP(hidden=hidden, kind=block.mlp_kind, name="mlp", **kw)(h)
        x = x + h.astype(x.dtype)
    return x, state


class LSSLBlock(nn.Module):
    """``x + mixer(Norm(x))`` (+ an optional MLP sub-block) around the :class:`LSSL` it
    holds; state: the LSSL's."""

    mixer: LSSL
    norm: str = "layer"
    norm_eps: float = 1e-5
    mlp_ratio: float = 0.0
    mlp_kind: str = "gelu"

    @property
    def features(self) -> int:
        return self.mixer.features

    def initial_state(self, batch_size: int) -> LSSLState:
        return self.mixer.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: LSSLState | None = None, resets=None):
        return _residual_block(self, x, state, resets)


class DiagonalSSMBlock(nn.Module):
    """``x + mixer(Norm(x))`` (+ an optional MLP sub-block) around the S4D layer
    (:class:`DiagonalSSM`) it holds; state: the layer's."""

    mixer: DiagonalSSM
    norm: str = "layer"
    norm_eps: float = 1e-5
    mlp_ratio: float = 0.0
    mlp_kind: str = "gelu"

    @property
    def features(self) -> int:
        return self.mixer.features

    def initial_state(self, batch_size: int) -> DiagonalSSMState:
        return self.mixer.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: DiagonalSSMState | None = None, resets=None):
        return _residual_block(self, x, state, resets)


__all__ = [
    "DiagonalSSM",
    "DiagonalSSMBlock",
    "DiagonalSSMState",
    "LSSL",
    "LSSLBlock",
    "LSSLState",
    "MambaBlock",
    "MambaMixer",
    "MambaState",
    "cache_discretized",
    "causal_fft_conv",
    "discretize",
    "hippo",
    "krylov",
    "legendre_basis",
    "legs_memory",
    "reconstruct",
]
