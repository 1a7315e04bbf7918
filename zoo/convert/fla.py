"""fla (flash-linear-attention 0.6.0) linear-attention layer weights -> mnemax params: the
``GatedLinearAttention`` and ``MultiScaleRetention`` layers, their ``GLABlock`` /
``RetNetBlock``, and TransNormerLLM's Lightning ``NormLinearAttention`` (outputs and final
states held equal by tests/test_linear_attention_layers.py's fixture).

The caller builds the mnemax module with the fla layer's sizes (the layers take their sizes as
constructor arguments, not a config file); :func:`linear_attention_from_fla` maps the
state_dict by name and checks every shape against the module's own parameters::

    fla / TransNormerLLM key            mnemax path                     array
    q_proj.weight (H d_k, d)            q_proj/kernel (d, H, d_k)       W^T, split by head
    k_proj.weight, v_proj.weight        k_proj/kernel, v_proj/kernel    W^T, split by head
    g_proj.weight                       g_proj/kernel (d, H, d_v)       W^T, split by head
    gk_proj.0.weight (r, d)             gk_proj_0/kernel (d, r)         W^T
    gk_proj.1.weight, gk_proj.1.bias    gk_proj_1/kernel, bias          W^T / b, split by head
    g_norm_swish_gate.weight, g_norm.weight  (same name)/scale (d_v,)   as is
    o_proj.weight (d, H d_v)            o_proj/kernel (H, d_v, d)       W^T, split by head
    qkvu_proj.weight (4 H d_h, d)       qkvu_proj/kernel (d, 4, H, d_h) W^T, split (Lightning)
    out_proj.weight (d, H d_h)          out_proj/kernel (H, d_h, d)     W^T, split (Lightning)
    q_conv1d.weight (C, 1, W)           q_conv1d/kernel (W, C)          W[:, 0, :]^T (GLA's
    k_conv1d.weight, v_conv1d.weight    k_conv1d/kernel, v_conv1d/...   use_short_conv)
    q_conv1d.bias (C,), k_, v_          q_conv1d/bias, ...              as is (conv_bias)
    block: attn_norm.weight, mlp_norm.weight -> attn_norm/scale, mlp_norm/scale; attn.<key> ->
    mixer/<path>; mlp.gate_proj / up_proj / down_proj.weight -> mlp/gate / up / down/kernel (W^T)

fla flattens heads head-major (``(h d)``), so every split is a plain reshape of W^T.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mnemax.layers.linear_attention import (
    GatedLinearAttention,
    LightningAttention,
    LinearAttentionBlock,
    MultiScaleRetention,
)

from .common import check_tree_matches, to_numpy

_MIXERS = (GatedLinearAttention, MultiScaleRetention, LightningAttention)

# A depthwise conv weight (C, 1, W) -> a CausalConv1d kernel (W, C).
_CONV = "conv"

# fla key -> (mnemax path, number of input axes of the kernel; None for vectors kept as they
# are; _CONV for a conv weight)
_MIXER_KEYS = {
    "q_proj.weight": (("q_proj", "kernel"), 1),
    "k_proj.weight": (("k_proj", "kernel"), 1),
    "v_proj.weight": (("v_proj", "kernel"), 1),
    "g_proj.weight": (("g_proj", "kernel"), 1),
    "gk_proj.0.weight": (("gk_proj_0", "kernel"), 1),
    "gk_proj.1.weight": (("gk_proj_1", "kernel"), 1),
    "gk_proj.1.bias": (("gk_proj_1", "bias"), None),
    "g_norm_swish_gate.weight": (("g_norm_swish_gate", "scale"), None),
    "g_norm.weight": (("g_norm", "scale"), None),
    "o_proj.weight": (("o_proj", "kernel"), 2),
    "qkvu_proj.weight": (("qkvu_proj", "kernel"), 1),
    "out_proj.weight": (("out_proj", "kernel"), 2),
    **{f"{n}_conv1d.weight": ((f"{n}_conv1d", "kernel"), _CONV) for n in "qkv"},
    **{f"{n}_conv1d.bias": ((f"{n}_conv1d", "bias"), None) for n in "qkv"},
}
_BLOCK_KEYS = {
    "attn_norm.weight": (("attn_norm", "scale"), None),
    "mlp_norm.weight": (("mlp_norm", "scale"), None),
    "mlp.gate_proj.weight": (("mlp", "gate", "kernel"), 1),
    "mlp.up_proj.weight": (("mlp", "up", "kernel"), 1),
    "mlp.down_proj.weight": (("mlp", "down", "kernel"), 1),
    **{f"attn.{k}": (("mixer",) + path, n_in) for k, (path, n_in) in _MIXER_KEYS.items()},
}


def _lookup(tree, path):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _insert(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def linear_attention_from_fla(module: nn.Module, state_dict: Mapping[str, Any], *, prefix: str = "") -> dict:
    """``{"params": ...}`` for ``module`` (a :class:`GatedLinearAttention`,
    :class:`MultiScaleRetention` or :class:`LightningAttention` mixer, or a
    :class:`~mnemax.layers.linear_attention.LinearAttentionBlock` holding one) from the
    state_dict of the matching fla layer or block (names as ``named_parameters()`` gives
    them; numpy arrays or torch tensors). ``prefix`` selects one layer of a model's
    state_dict (e.g. ``"model.layers.0.attn."``; keys without it are ignored then).
    ValueError names a missing key, a key this converter does not map, or a wrong shape."""
    if isinstance(module, LinearAttentionBlock):
        table, mixer = _BLOCK_KEYS, module.mixer
    elif isinstance(module, _MIXERS):
        table, mixer = _MIXER_KEYS, module
    else:
        raise TypeError(f"module must be a GatedLinearAttention, MultiScaleRetention, LightningAttention or a "
                        f"LinearAttentionBlock, got {type(module).__name__}")
    x = jnp.zeros((1, 2, mixer.features), jnp.float32)
    want = nn.meta.unbox(jax.eval_shape(module.clone(parent=None).init, jax.random.key(0), x)["params"])
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    unknown = sorted(k for k in sd if k not in table or _lookup(want, table[k][0]) is None)
    if unknown:
        raise ValueError(f"state_dict has keys this converter does not map to {type(module).__name__}: "
                         f"{[prefix + k for k in unknown[:8]]}")
    params: dict = {}
    for key, (path, n_in) in table.items():
        target = _lookup(want, path)
        if target is None:
            continue
        if key not in sd:
            raise ValueError(f"state_dict is missing {prefix + key!r} (have e.g. {sorted(sd)[:6]})")
        w, shape = to_numpy(sd[key]), tuple(target.shape)
        if n_in is None:
            expect = (int(np.prod(shape)),)
        elif n_in == _CONV:  # (channels, 1, width) for a kernel (width, channels)
            expect = (shape[1], 1, shape[0])
        else:  # nn.Linear weight (out, in) for a kernel (in axes..., out axes...)
            expect = (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
        if w.shape != expect:
            raise ValueError(f"state_dict[{prefix + key!r}] must have shape {expect} for this "
                             f"{type(module).__name__}, got {w.shape}")
        value = w if n_in is None else w[:, 0, :].T if n_in == _CONV else w.T
        _insert(params, path, value.reshape(shape))
    check_tree_matches(params, want, f"the mnemax {type(module).__name__}")
    return {"params": jax.tree.map(jnp.asarray, params)}
