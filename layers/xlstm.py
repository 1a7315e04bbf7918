"""xLSTM residual blocks and the ``xLSTM[a:b]`` stack (Beck et al., 2024; xLSTM 7B, 2025).

Blocks (each returns ``x + ...`` and follows the layer contract; layers and their
equations are in :mod:`mnemax.layers.xlstm_cells`)::

    MLSTMBlock:       x + MLSTMLayer(LN(x))                               (pre up-projection)
    SLSTMBlock:       x = x + SLSTMLayer(LN(x));  x + GatedFFN(LN(x))       (post up-projection,
                      FFN width up_proj_dim(d, ffn_proj_factor, ffn_round_to, ffn_round_mode),
                      ceil(1.3 d / 64) 64 by default, GeLU; no FFN when ffn_proj_factor is None)
    XLSTMLargeBlock:  x = x + MLSTMLargeLayer(RMSNorm(x));  x + SwiGLU(RMSNorm(x))   (xLSTM 7B;
                      FFN width large_ffn_dim(d, ffn_proj_factor, ffn_round_to):
                      ((d f + r - 1) // r) r, which is not ceil(d f / r) r for every d)

Both width rules are upstream's, in :mod:`mnemax.layers.xlstm_widths`.

A block holds its layer (``mlstm`` / ``slstm``: the unbound layer, whose parameters and
state are the block's) and adds the FFN's options; its norms run with the layer's
``norm_eps``, dtype and param_dtype. LN is a layer norm without bias (eps ``norm_eps`` =
1e-5, upstream's default); the 7B block's RMSNorms use ``norm_eps`` = 1e-6::

    MLSTMBlock(mlstm=MLSTMLayer(features=F, num_heads=4))
    SLSTMBlock(slstm=SLSTMLayer(features=F, num_heads=4), ffn_proj_factor=1.3)

``XLSTMStack`` is ``xLSTM[a:b]``: ``n_blocks`` blocks, sLSTM blocks at the indices in
``slstm_at`` ("all" for every block), mLSTM blocks elsewhere, and an optional final
layer norm (upstream's ``post_blocks_norm``). Its state is the tuple of its blocks'
states. The zoo family ``xlstm`` builds the same blocks through
:meth:`XLSTMStack.make_block`.

Shapes::

    y, state = XLSTMStack(features=F, n_blocks=L, slstm_at=(1,))(x, state, resets)
    x, y: (batch, time, F);  state: tuple of L block states
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mnemax.kernels import MLSTMState

from .base import Dtype, check_resets, check_sequence, check_state, expected_state
from .mlp import MLP
from .norms import LayerNorm, RMSNorm
from .xlstm_cells import (
    GatedFFN,
    MLSTMLargeLayer,
    MLSTMLayer,
    MLSTMLayerState,
    SLSTMLayer,
    SLSTMLayerState,
)
from .xlstm_widths import ROUND_MODES, large_ffn_dim, up_proj_dim

__all__ = [  # the layers live in xlstm_cells; importable from here too
    "GatedFFN",
    "MLSTMBlock",
    "MLSTMLargeLayer",
    "MLSTMLayer",
    "MLSTMLayerState",
    "SLSTMBlock",
    "SLSTMLayer",
    "SLSTMLayerState",
    "XLSTMLargeBlock",
    "XLSTMStack",
]


class MLSTMBlock(nn.Module):
    """``x + mlstm(LN(x))`` around the :class:`MLSTMLayer` it holds; state: MLSTMLayerState."""

    mlstm: MLSTMLayer

    @property
    def features(self) -> int:
        return self.mlstm.features

    def initial_state(self, batch_size: int) -> MLSTMLayerState:
        return self.mlstm.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: MLSTMLayerState | None = None, resets=None):
        check_sequence(x, self.features)
        layer = self.mlstm
        h, _ = LayerNorm(eps=layer.norm_eps, use_bias=False, dtype=layer.dtype, param_dtype=layer.param_dtype, name="norm")(x)
        h, state = layer(h, state, resets)
        return x + h.astype(x.dtype), state


class SLSTMBlock(nn.Module):
    """``x + slstm(LN(x))`` around the :class:`SLSTMLayer` it holds, then ``+ GatedFFN(LN(.))``
    of width ``up_proj_dim(features, ffn_proj_factor, ffn_round_to, ffn_round_mode)`` (no
    FFN for ``ffn_proj_factor=None``); state: SLSTMLayerState."""

    slstm: SLSTMLayer
    ffn_proj_factor: float | None = 1.3
    ffn_act: str = "gelu"
    ffn_round_to: int = 64
    ffn_round_mode: str = "up"

    @property
    def features(self) -> int:
        return self.slstm.features

    @property
    def ffn_hidden(self) -> int | None:
        """The FFN's hidden width (upstream ``FeedForwardConfig._proj_up_dim``); None without an FFN."""
        if self.ffn_proj_factor is None:
            return None
        if self.ffn_round_mode not in ROUND_MODES:
            raise ValueError(f"ffn_round_mode must be one of {ROUND_MODES}, got {self.ffn_round_mode!r}")
        hidden = up_proj_dim(self.features, self.ffn_proj_factor, self.ffn_round_to, self.ffn_round_mode)
        if hidden <= 0:
            raise ValueError(
                f"the FFN width (ffn_proj_factor {self.ffn_proj_factor} x features {self.features}, rounded "
                f"{self.ffn_round_mode} to a multiple of ffn_round_to {self.ffn_round_to}) must be positive, got {hidden}"
            )
        return hidden

    def initial_state(self, batch_size: int) -> SLSTMLayerState:
        return self.slstm.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: SLSTMLayerState | None = None, resets=None):
        check_sequence(x, self.features)
        layer = self.slstm
        kw = dict(dtype=layer.dtype, param_dtype=layer.param_dtype)
        h, _ = LayerNorm(eps=layer.norm_eps, use_bias=False, name="norm", **kw)(x)
        hidden = self.ffn_hidden
        h, state = layer(h, state, resets)
        x = x + h.astype(x.dtype)
        if hidden is not None:
            h, _ = LayerNorm(eps=layer.norm_eps, use_bias=False, name="ffn_norm", **kw)(x)
            h, _ = GatedFFN(hidden=hidden, act=self.ffn_act, num_blocks=layer.num_blocks, name="ffn", **kw)(h)
            x = x + h.astype(x.dtype)
        return x, state


class XLSTMLargeBlock(nn.Module):
    """The xLSTM 7B block: ``x + mlstm(RMSNorm(x))`` around the :class:`MLSTMLargeLayer` it
    holds, then ``+ SwiGLU(RMSNorm(.))`` of width ``large_ffn_dim(features, ffn_proj_factor,
    ffn_round_to)``; state: MLSTMState."""

    mlstm: MLSTMLargeLayer
    ffn_proj_factor: float = 2.6667
    ffn_round_to: int = 64

    @property
    def features(self) -> int:
        return self.mlstm.features

    @property
    def ffn_hidden(self) -> int:
        """The SwiGLU FFN's hidden width (upstream ``FeedForward.up_proj_dim``)."""
        return large_ffn_dim(self.features, self.ffn_proj_factor, self.ffn_round_to)

    def initial_state(self, batch_size: int) -> MLSTMState:
        return self.mlstm.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: MLSTMState | None = None, resets=None):
        check_sequence(x, self.features)
        layer = self.mlstm
        kw = dict(dtype=layer.dtype, param_dtype=layer.param_dtype)
        h, _ = RMSNorm(eps=layer.norm_eps, name="norm_mlstm", **kw)(x)
        h, state = layer(h, state, resets)
        x = x + h.astype(x.dtype)
        h, _ = RMSNorm(eps=layer.norm_eps, name="norm_ffn", **kw)(x)
        h, _ = MLP(hidden=self.ffn_hidden, kind="swiglu", name="ffn", **kw)(h)
        return x + h.astype(x.dtype), state


class XLSTMStack(nn.Module):
    """``xLSTM[a:b]``: mLSTM blocks with sLSTM blocks at ``slstm_at`` (see module docstring).

    ``num_heads``, ``proj_factor``, ``round_to``, ``round_mode``, ``conv_width``,
    ``qkv_blocksize``, ``chunk_size``, ``eps`` and ``backend`` configure the mLSTM blocks;
    ``slstm_heads``, ``slstm_conv_width``, ``slstm_bias_init``, ``slstm_backend``,
    ``ffn_proj_factor``, ``ffn_act``, ``ffn_round_to`` and ``ffn_round_mode`` the sLSTM
    blocks. The rounded widths follow upstream (:mod:`mnemax.layers.xlstm_widths`);
    :func:`mnemax.convert.xlstm_from_torch` builds this stack from an upstream
    ``xLSTMBlockStack``.
    """

    features: int
    n_blocks: int
    slstm_at: Sequence[int] | str = ()
    num_heads: int = 4
    proj_factor: float = 2.0
    round_to: int = 64
    round_mode: str = "up"
    conv_width: int = 4
    qkv_blocksize: int = 4
    chunk_size: int = 64
    eps: float = 1e-6
    backend: str | None = None
    slstm_heads: int = 4
    slstm_conv_width: int = 4
    slstm_bias_init: str = "powerlaw_blockdependent"
    slstm_backend: str | None = None
    ffn_proj_factor: float | None = 1.3
    ffn_act: str = "gelu"
    ffn_round_to: int = 64
    ffn_round_mode: str = "up"
    norm_eps: float = 1e-5
    post_norm: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def slstm_indices(self) -> tuple[int, ...]:
        if isinstance(self.slstm_at, str):
            if self.slstm_at != "all":
                raise ValueError(f"slstm_at must be a sequence of block indices or 'all', got {self.slstm_at!r}")
            return tuple(range(self.n_blocks))
        at = tuple(int(i) for i in self.slstm_at)
        bad = [i for i in at if not 0 <= i < self.n_blocks]
        if bad:
            raise ValueError(f"slstm_at indices must lie in [0, {self.n_blocks}), got {list(at)}")
        return at

    def make_block(self, index: int, **kw) -> nn.Module:
        """Block ``index`` of the stack (an SLSTMBlock at ``slstm_at``, else an MLSTMBlock),
        with ``kw`` (``name``, ``parent``) passed to the block."""
        common = dict(
            features=self.features, num_blocks=self.n_blocks, norm_eps=self.norm_eps,
            dtype=self.dtype, param_dtype=self.param_dtype, parent=None,
        )
        if index in self.slstm_indices():
            layer = SLSTMLayer(
                num_heads=self.slstm_heads, conv_width=self.slstm_conv_width, block_index=index,
                bias_init=self.slstm_bias_init, backend=self.slstm_backend, **common,
            )
            return SLSTMBlock(
                slstm=layer, ffn_proj_factor=self.ffn_proj_factor, ffn_act=self.ffn_act, ffn_round_to=self.ffn_round_to,
                ffn_round_mode=self.ffn_round_mode, **kw,
            )
        layer = MLSTMLayer(
            num_heads=self.num_heads, proj_factor=self.proj_factor, round_to=self.round_to,
            round_mode=self.round_mode, conv_width=self.conv_width,
            qkv_blocksize=self.qkv_blocksize, chunk_size=self.chunk_size, eps=self.eps,
            backend=self.backend, **common,
        )
        return MLSTMBlock(mlstm=layer, **kw)

    def initial_state(self, batch_size: int) -> tuple:
        return tuple(self.make_block(i, parent=None).initial_state(batch_size) for i in range(self.n_blocks))

    @nn.compact
    def __call__(self, x, state: tuple | None = None, resets=None):
        check_sequence(x, self.features)
        batch = x.shape[0]
        check_resets(resets, batch, x.shape[1])
        if state is None:
            state = (None,) * self.n_blocks
        else:
            check_state(state, expected_state(self, batch))
        new_states = []
        for i in range(self.n_blocks):
            x, s = self.make_block(i, name=f"block_{i}")(x, state[i], resets)
            new_states.append(s)
        if self.post_norm:
            x, _ = LayerNorm(eps=self.norm_eps, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="post_norm")(x)
        return x, tuple(new_states)
