"""PyPI ``xlstm`` 2.0.6 (PyTorch) -> mnemax, for every module people load or embed:

* ``xLSTMLMModel`` (NeurIPS block stack with embedding and head) -> an ``xlstm`` model;
* a bare ``xLSTMBlockStack`` (the package README's first example) -> an
  :class:`~mnemax.layers.XLSTMStack` layer;
* ``xLSTMLarge`` (the xLSTM 7B layout) at any size -> an ``xlstm_large`` model.

The config may be upstream's dataclass, ``dataclasses.asdict`` of it, or the keyword
arguments it was built from; :mod:`mnemax.convert.xlstm_config` reads it (upstream's
defaults for absent fields, every rounded width as upstream computes it). The converted
tree is checked against the mnemax module's own shapes.

Bad configs raise ``ValueError`` naming the field by its path in upstream's config
(e.g. ``config.slstm_block.slstm.num_heads``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnemax.layers.xlstm import XLSTMStack
from mnemax.layers.xlstm_widths import large_qk_v_dims

from ..config import ModelConfig
from .common import check_tree_matches, model_param_shapes, to_numpy
from .xlstm_config import (
    NeuripsLayout,
    as_dict,
    config_layout,
    neurips_layout,
    neurips_model_config,
    xlstm_config_from_torch,
    xlstm_stack_config_from_torch,
)

__all__ = ["xlstm_config_from_torch", "xlstm_from_torch", "xlstm_stack_config_from_torch"]

# ----------------------------------------------------------------------------- mapping the weights


class _StateDict:
    """Reads a state_dict's entries as float32 numpy arrays and remembers which were read."""

    def __init__(self, state_dict: Mapping[str, Any]):
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        self.entries = state_dict
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.entries:
            keys = sorted(self.entries)
            raise ValueError(f"state_dict has no entry {name!r} (has {len(keys)} entries, e.g. {keys[:3]})")
        self.used.add(name)
        return to_numpy(self.entries[name])

    def check_all_used(self) -> None:
        leftover = sorted(set(self.entries) - self.used)
        if leftover:
            raise ValueError(f"state_dict has entries this config does not explain: {leftover[:8]}")


def _conv(sd: _StateDict, pre: str) -> dict:
    return {"kernel": sd(pre + "conv1d.conv.weight")[:, 0, :].T, "bias": sd(pre + "conv1d.conv.bias")}


def _mlstm_layer(sd: _StateDict, pre: str, layout: NeuripsLayout) -> dict:
    cell = pre + "mlstm_cell."
    out = {
        "proj_up": {"kernel": sd(pre + "proj_up.weight").T},
        "q_proj": {"kernel": sd(pre + "q_proj.weight").transpose(0, 2, 1)},
        "k_proj": {"kernel": sd(pre + "k_proj.weight").transpose(0, 2, 1)},
        "v_proj": {"kernel": sd(pre + "v_proj.weight").transpose(0, 2, 1)},
        "igate": {"kernel": sd(cell + "igate.weight").T, "bias": sd(cell + "igate.bias")},
        "fgate": {"kernel": sd(cell + "fgate.weight").T, "bias": sd(cell + "fgate.bias")},
        "outnorm": 1.0 + sd(cell + "outnorm.weight"),
        "learnable_skip": sd(pre + "learnable_skip"),
        "proj_down": {"kernel": sd(pre + "proj_down.weight").T},
    }
    if layout.stack["conv_width"]:
        out["conv"] = _conv(sd, pre)
    return out


def _slstm_layer(sd: _StateDict, pre: str, layout: NeuripsLayout) -> dict:
    heads = layout.stack["slstm_heads"]
    d = layout.stack["features"]
    dh = d // heads
    r = sd(pre + "slstm_cell._recurrent_kernel_")
    b = sd(pre + "slstm_cell._bias_")
    if layout.slstm_backend == "vanilla":  # R: (heads, 4 * d_out, d_in); b: (4, heads, d) flattened
        recurrent = r.reshape(heads, 4, dh, dh).transpose(0, 3, 1, 2)
        bias = b.reshape(4, heads, dh)
    else:  # cuda: R: (heads, d_in, 4 * d_out); b: (heads, 4, d) flattened
        recurrent = r.reshape(heads, dh, 4, dh)
        bias = b.reshape(heads, 4, dh).transpose(1, 0, 2)
    # Upstream's module "fgate" computes the INPUT gate and "igate" the FORGET gate.
    gates = [sd(pre + f"{name}.weight").transpose(0, 2, 1) for name in ("fgate", "igate", "zgate", "ogate")]
    norm = pre + "group_norm.weight"
    out = {
        "gate_kernel": np.stack(gates),
        "recurrent_kernel": recurrent,
        "bias": bias,
        # without group_norm_weight upstream normalises with scale 1
        "group_norm": 1.0 + sd(norm) if layout.group_norm_weight else np.ones((d,), np.float32),
    }
    if layout.stack["slstm_conv_width"]:
        out["conv"] = _conv(sd, pre)
    return out


def _neurips_blocks(sd: _StateDict, prefix: str, layout: NeuripsLayout) -> dict:
    """``block_{i}`` params of every block of a stack whose entries start with ``prefix``."""
    params: dict[str, Any] = {}
    for i in range(layout.stack["n_blocks"]):
        pre = f"{prefix}blocks.{i}."
        blk: dict[str, Any] = {"norm": {"scale": 1.0 + sd(pre + "xlstm_norm.weight")}}
        if i in layout.slstm_indices:
            blk["slstm"] = _slstm_layer(sd, pre + "xlstm.", layout)
            if layout.stack["ffn_proj_factor"] is not None:
                blk["ffn_norm"] = {"scale": 1.0 + sd(pre + "ffn_norm.weight")}
                blk["ffn"] = {
                    "proj_up": {"kernel": sd(pre + "ffn.proj_up.weight").T},
                    "proj_down": {"kernel": sd(pre + "ffn.proj_down.weight").T},
                }
        else:
            blk["mlstm"] = _mlstm_layer(sd, pre + "xlstm.", layout)
        params[f"block_{i}"] = blk
    return params


def _neurips_lm_params(sd: _StateDict, layout: NeuripsLayout) -> dict:
    params: dict[str, Any] = {"embed": {"embedding": sd("token_embedding.weight")}}
    params.update(_neurips_blocks(sd, "xlstm_block_stack.", layout))
    if layout.stack["post_norm"]:
        params["final_norm"] = {"scale": 1.0 + sd("xlstm_block_stack.post_blocks_norm.weight")}
    if not layout.tie_weights:
        params["head"] = {"kernel": sd("lm_head.weight").T}
    elif "lm_head.weight" in sd:
        sd("lm_head.weight")  # tied: the embedding matrix again
    return params


def _neurips_stack_params(sd: _StateDict, layout: NeuripsLayout) -> dict:
    params = _neurips_blocks(sd, "", layout)
    if layout.stack["post_norm"]:
        params["post_norm"] = {"scale": 1.0 + sd("post_blocks_norm.weight")}
    return params


def _large_params(sd: _StateDict, mcfg: ModelConfig) -> dict:
    d, heads = mcfg.d_model, mcfg.block["num_heads"]
    qk, v = large_qk_v_dims(d, mcfg.block["qk_dim_factor"], mcfg.block["v_dim_factor"])
    params: dict[str, Any] = {"embed": {"embedding": sd("embedding.weight")}}
    for i in range(mcfg.n_layers):
        pre = f"backbone.blocks.{i}."
        lay = pre + "mlstm_layer."
        if lay + "qkv_opreact.weight" in sd:  # weight_mode="fused"
            wq, wk, wv, wo = np.split(sd(lay + "qkv_opreact.weight"), [qk, 2 * qk, 2 * qk + v])
            wi, wf = np.split(sd(lay + "ifgate_preact.weight"), [heads])
            bi, bf = np.split(sd(lay + "ifgate_preact.bias"), [heads])
            w_gate, w_up = np.split(sd(pre + "ffn.proj_up_gate_z.weight"), 2)
        else:
            wq, wk, wv, wo = (sd(lay + f"{n}.weight") for n in ("q", "k", "v", "ogate_preact"))
            wi, wf = sd(lay + "igate_preact.weight"), sd(lay + "fgate_preact.weight")
            bi, bf = sd(lay + "igate_preact.bias"), sd(lay + "fgate_preact.bias")
            w_gate, w_up = sd(pre + "ffn.proj_up_gate.weight"), sd(pre + "ffn.proj_up.weight")
        params[f"block_{i}"] = {
            "norm_mlstm": {"scale": sd(pre + "norm_mlstm.weight")},
            "mlstm": {
                "q": {"kernel": wq.T}, "k": {"kernel": wk.T}, "v": {"kernel": wv.T},
                "ogate_preact": {"kernel": wo.T},
                "igate_preact": {"kernel": wi.T, "bias": bi},
                "fgate_preact": {"kernel": wf.T, "bias": bf},
                "multihead_norm": sd(lay + "multihead_norm.weight"),
                "out_proj": {"kernel": sd(lay + "out_proj.weight").T},
            },
            "norm_ffn": {"scale": sd(pre + "norm_ffn.weight")},
            "ffn": {
                "gate": {"kernel": w_gate.T}, "up": {"kernel": w_up.T},
                "down": {"kernel": sd(pre + "ffn.proj_down.weight").T},
            },
        }
    if mcfg.final_norm != "none":
        params["final_norm"] = {"scale": sd("backbone.out_norm.weight")}
    params["head"] = {"kernel": sd("lm_head.weight").T}
    return params


def _stack_param_shapes(stack: XLSTMStack) -> dict:
    import flax.linen as nn

    x = jnp.zeros((1, 1, stack.features), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(stack.init, jax.random.key(0), x)["params"])


def xlstm_from_torch(state_dict: Mapping[str, Any], config, *, dtype=jnp.float32):
    """Converts a PyPI ``xlstm`` 2.0.6 module's ``state_dict`` to mnemax.

    Args:
      state_dict: ``module.state_dict()`` of one of
        * an ``xLSTMLMModel`` (entries ``token_embedding.*``, ``xlstm_block_stack.*``, ``lm_head.*``);
        * a bare ``xLSTMBlockStack`` (entries ``blocks.{i}.*``, ``post_blocks_norm.*``);
        * an ``xLSTMLarge`` (entries ``embedding.*``, ``backbone.*``, ``lm_head.*``;
          ``weight_mode`` "single" or "fused").
        sLSTM weights are read in the storage layout of the config's sLSTM ``backend``
        ("vanilla" or "cuda"). Every entry must be used.
      config: the module's config -- the upstream dataclass, ``dataclasses.asdict`` of it,
        or the keyword arguments it was built from (absent fields take upstream's defaults).
      dtype: dtype of the returned parameters.

    Returns:
      For a language model, ``(model_config, variables)``: the mnemax :class:`ModelConfig` and
      ``{"params": ...}`` for ``mnemax.build(model_config).apply(variables, tokens)``.
      For a bare block stack, ``(stack, variables)``: an unbound
      :class:`~mnemax.layers.XLSTMStack` with ``y, state = stack.apply(variables, x)`` equal
      to upstream's ``stack(x)`` (x: (batch, time, embedding_dim)).
      Outputs and states are held equal to upstream's by fixtures (1e-4 in float32).
    """
    sd = _StateDict(state_dict)
    cfg = as_dict(config, "config")
    if config_layout(cfg) == "large":
        if not any(k.startswith("backbone.") for k in sd.entries):
            raise ValueError("config is an xLSTMLargeConfig but state_dict has no 'backbone.*' entries (an xLSTMLarge's)")
        mcfg = xlstm_config_from_torch(cfg)
        params = _large_params(sd, mcfg)
        want, what = model_param_shapes(mcfg), "the mnemax xlstm_large model"
        result = mcfg
    elif "token_embedding.weight" in sd or any(k.startswith("xlstm_block_stack.") for k in sd.entries):
        layout = neurips_layout(cfg, lm=True)
        result = neurips_model_config(layout)
        params = _neurips_lm_params(sd, layout)
        want, what = model_param_shapes(result), "the mnemax xlstm model"
    elif any(k.startswith("blocks.") for k in sd.entries):
        layout = neurips_layout(cfg, lm=False)
        result = XLSTMStack(**layout.stack, parent=None)
        params = _neurips_stack_params(sd, layout)
        want, what = _stack_param_shapes(result), "the mnemax XLSTMStack"
    else:
        raise ValueError(
            "state_dict is not an xLSTMLMModel's ('token_embedding.*', 'xlstm_block_stack.*') nor a bare "
            f"xLSTMBlockStack's ('blocks.*'): entries e.g. {sorted(sd.entries)[:4]}"
        )
    sd.check_all_used()
    check_tree_matches(params, want, what)
    return result, {"params": jax.tree.map(lambda a: jnp.asarray(a, dtype), params)}
