"""A Qwen3-Next Gated DeltaNet layer (HF ``transformers``' ``Qwen3NextGatedDeltaNet``) -> a mnemax
:class:`~mnemax.layers.delta_net.GatedDeltaNet` mixer and its params (outputs and states held
equal by tests/test_gated_deltanet.py's fixture).

Qwen3-Next fuses the projections; with r = H_v / H_k value heads per key head they are laid
out per KEY head h (``fix_query_key_value_ordering``)::

    in_proj_qkvz.weight (2 H_k d_k + 2 H_v d_v, d):  rows of key head h:
        [q_h (d_k) | k_h (d_k) | v of value heads h r .. h r + r - 1 (r d_v) | z of the same (r d_v)]
    in_proj_ba.weight (2 H_v, d):  rows of key head h:  [b of its r value heads | a of the same]
    conv1d.weight (2 H_k d_k + H_v d_v, 1, W):  channels [q | k | v], each head-major
    out_proj.weight (d, H_v d_v);  norm.weight (d_v,);  A_log, dt_bias (H_v,)

and map to mnemax's separate projections: q -> ``q_proj``, k -> ``k_proj``, v -> ``v_proj``,
z (the output gate) -> ``g_proj``, a -> ``a_proj``, b -> ``b_proj``; the conv's q/k/v channel
slices -> ``q_conv1d``/``k_conv1d``/``v_conv1d`` (kernel (W, channels)); ``norm`` -> ``o_norm``;
``out_proj`` -> ``o_proj``. Qwen3-Next's conv state (batch, conv_dim, W) holds the last W conv
inputs; mnemax keeps the last W - 1 (:func:`conv_state_from_qwen3next`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mnemax.layers.delta_net import GatedDeltaNet, GatedDeltaNetState

from .common import cfg_get, check_tree_matches, to_numpy

_LAYER_KEYS = ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "A_log", "dt_bias", "norm.weight",
               "out_proj.weight")


def gated_deltanet_config_from_qwen3next(hf_config) -> dict[str, Any]:
    """The :class:`GatedDeltaNet` options (``features`` included) of an HF ``Qwen3NextConfig``
    (object or its ``to_dict()``): ``linear_num_key_heads`` -> num_heads,
    ``linear_num_value_heads`` -> num_v_heads, ``linear_key_head_dim`` -> head_dim,
    ``linear_value_head_dim`` / ``linear_key_head_dim`` -> expand_v, ``linear_conv_kernel_dim``
    -> conv_size, ``rms_norm_eps`` -> norm_eps."""
    get = lambda k, d=None: cfg_get(hf_config, k, d)  # noqa: E731
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hf_config.hidden_act must be 'silu' (the conv activation of the GDN layer), got {act!r}")
    dk, dv = int(get("linear_key_head_dim")), int(get("linear_value_head_dim"))
    hk, hv = int(get("linear_num_key_heads")), int(get("linear_num_value_heads"))
    if hv % hk:
        raise ValueError(f"hf_config.linear_num_value_heads must be a multiple of linear_num_key_heads ({hk}), got {hv}")
    return dict(
        features=int(get("hidden_size")), num_heads=hk, num_v_heads=hv, head_dim=dk, expand_v=dv / dk,
        conv_size=int(get("linear_conv_kernel_dim", 4)), conv_bias=False, use_gate=True, allow_neg_eigval=False,
        norm_eps=float(get("rms_norm_eps", 1e-6)), initializer_range=float(get("initializer_range", 0.02)),
    )


def gated_deltanet_from_qwen3next(state_dict: Mapping[str, Any], hf_config, *, prefix: str = "",
                                  **mixer_options) -> tuple[GatedDeltaNet, dict]:
    """Converts one ``Qwen3NextGatedDeltaNet`` layer's weights to ``(mixer, {"params": ...})``
    ready for ``mixer.apply``. ``state_dict`` maps names to arrays (numpy, torch tensors, ...);
    ``prefix`` selects one layer of a model's state_dict (e.g. ``"model.layers.0.linear_attn."``;
    keys without it are ignored then). ``mixer_options`` (``backend``, ``chunk_size``, ``dtype``,
    ...) go to the :class:`GatedDeltaNet`.
    """
    options = gated_deltanet_config_from_qwen3next(hf_config)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [k for k in _LAYER_KEYS if k not in sd]
    if missing:
        raise ValueError(f"state_dict is missing {[prefix + k for k in missing]} (have e.g. {sorted(sd)[:6]})")
    extra = sorted(set(sd) - set(_LAYER_KEYS))
    if extra:
        raise ValueError(f"state_dict has keys this converter does not map: {[prefix + k for k in extra[:8]]}")
    mixer = GatedDeltaNet(**{**options, **mixer_options}, parent=None)
    d, hk, hv, dk, dv = mixer.features, mixer.num_heads, mixer.value_heads, mixer.head_dim, mixer.head_v_dim
    r, key_dim = hv // hk, hk * dk
    w = {k: to_numpy(v) for k, v in sd.items()}

    def shaped(key, shape):
        if w[key].shape != shape:
            raise ValueError(f"state_dict[{prefix + key!r}] must have shape {shape}, got {w[key].shape}")
        return w[key]

    qkvz = shaped("in_proj_qkvz.weight", (2 * key_dim + 2 * hv * dv, d)).reshape(hk, 2 * dk + 2 * r * dv, d)
    q, k, v, z = np.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=1)
    ba = shaped("in_proj_ba.weight", (2 * hv, d)).reshape(hk, 2 * r, d)
    b, a = ba[:, :r].reshape(hv, d), ba[:, r:].reshape(hv, d)
    conv = shaped("conv1d.weight", (2 * key_dim + hv * dv, 1, mixer.conv_size))[:, 0, :].T  # (W, channels)

    def heads(m, n_heads, dim):  # (heads, [r,] dim, d) -> kernel (d, heads, dim)
        return m.reshape(n_heads, dim, d).transpose(2, 0, 1)

    params = {
        "q_proj": {"kernel": heads(q, hk, dk)},
        "k_proj": {"kernel": heads(k, hk, dk)},
        "v_proj": {"kernel": heads(v, hv, dv)},
        "g_proj": {"kernel": heads(z, hv, dv)},
        "b_proj": {"kernel": b.T},
        "a_proj": {"kernel": a.T},
        "q_conv1d": {"kernel": conv[:, :key_dim]},
        "k_conv1d": {"kernel": conv[:, key_dim : 2 * key_dim]},
        "v_conv1d": {"kernel": conv[:, 2 * key_dim :]},
        "A_log": shaped("A_log", (hv,)),
        "dt_bias": shaped("dt_bias", (hv,)),
        "o_norm": {"scale": shaped("norm.weight", (dv,))},
        "o_proj": {"kernel": shaped("out_proj.weight", (d, hv * dv)).T.reshape(hv, dv, d)},
    }
    want = jax.eval_shape(mixer.init, jax.random.key(0), jnp.zeros((1, 2, d), jnp.float32))["params"]
    check_tree_matches(params, nn.meta.unbox(want), "the mnemax GatedDeltaNet for this config")
    return mixer, {"params": jax.tree.map(jnp.asarray, params)}


def conv_state_from_qwen3next(conv_state, mixer: GatedDeltaNet) -> GatedDeltaNetState:
    """Qwen3-Next's conv state (batch, conv_dim, W) -- the last W pre-conv inputs, oldest first,
    channels [q | k | v] -- as the conv fields of a mnemax state (the last W - 1 inputs, time
    before channels); ``S`` is left zero (Qwen3-Next's recurrent state is mnemax's ``S``)."""
    c = to_numpy(conv_state)
    key_dim = mixer.num_heads * mixer.head_dim
    want = (c.shape[0], 2 * key_dim + mixer.value_heads * mixer.head_v_dim, mixer.conv_size)
    if c.shape != want:
        raise ValueError(f"conv_state must have shape (batch, conv_dim, conv_size) = {want}, got {c.shape}")
    tail = np.transpose(c[:, :, 1:], (0, 2, 1))  # (batch, W - 1, conv_dim)
    zeros = mixer.initial_state(c.shape[0])
    return zeros._replace(
        conv_q=jnp.asarray(tail[..., :key_dim]), conv_k=jnp.asarray(tail[..., key_dim : 2 * key_dim]),
        conv_v=jnp.asarray(tail[..., 2 * key_dim :]),
    )
