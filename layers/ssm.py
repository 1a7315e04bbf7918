"""The state-space family: LSSL (HiPPO), the diagonal SSM (S4D) and Mamba.

The layers live in :mod:`~mnemax.layers.lssl`, :mod:`~mnemax.layers.s4d` and
:mod:`~mnemax.layers.mamba` (see their docstrings for the equations); this module
gathers them and adds the residual blocks the zoo stacks::

    LSSLBlock / DiagonalSSMBlock:  x = x + Mixer(Norm(x));  x = x + MLP(Norm(x)) if mlp_ratio > 0
    MambaBlock:                    x = x + MambaMixer(RMSNorm(x))   (residual in float32)

A block has its mixer's fields (and the mixer's state) plus ``norm`` ("layer" or
"rms"), ``norm_eps``, ``mlp_ratio`` and ``mlp_kind``.

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
from .mamba import MambaBlock, MambaMixer, MambaState, mixer_fields
from .mlp import MLP
from .norms import make_norm
from .s4d import DiagonalSSM, DiagonalSSMState


def _residual_block(block, mixer_cls, x, state, resets):
    """Pre-norm residual around ``mixer_cls`` (built from the block's fields), then an
    optional pre-norm MLP. Called inside the block's compact ``__call__``."""
    check_sequence(x, block.features, name="x")
    kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
    h, _ = make_norm(block.norm, eps=block.norm_eps, name="norm", **kw)(x)
    h, state = mixer_cls(**mixer_fields(block, mixer_cls), name="mixer")(h, state, resets)
    x = x + h.astype(x.dtype)
    if block.mlp_ratio > 0:
        h, _ = make_norm(block.norm, eps=block.norm_eps, name="mlp_norm", **kw)(x)
        hidden = int(round(block.mlp_ratio * block.features))
        h, _ = MLP(hidden=hidden, kind=block.mlp_kind, name="mlp", **kw)(h)
        x = x + h.astype(x.dtype)
    return x, state


class LSSLBlock(LSSL):
    """``x + LSSL(Norm(x))`` (+ an optional MLP sub-block); the LSSL's fields and state."""

    norm: str = "layer"
    norm_eps: float = 1e-5
    mlp_ratio: float = 0.0
    mlp_kind: str = "gelu"

    @nn.compact
    def __call__(self, x, state: LSSLState | None = None, resets=None):
        return _residual_block(self, LSSL, x, state, resets)


class DiagonalSSMBlock(DiagonalSSM):
    """``x + DiagonalSSM(Norm(x))`` (+ an optional MLP sub-block); the S4D layer's fields and state."""

    norm: str = "layer"
    norm_eps: float = 1e-5
    mlp_ratio: float = 0.0
    mlp_kind: str = "gelu"

    @nn.compact
    def __call__(self, x, state: DiagonalSSMState | None = None, resets=None):
        return _residual_block(self, DiagonalSSM, x, state, resets)


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
