"""Converters from official PyTorch checkpoints to mnemax params.

* :mod:`mnemax.convert.mamba`: HF ``transformers`` Mamba (``MambaForCausalLM`` / ``MambaModel``).
* :mod:`mnemax.convert.mamba2`: HF ``transformers`` Mamba-2 (``Mamba2ForCausalLM`` / ``Mamba2Model``).
* :mod:`mnemax.convert.qwen3next`: one HF ``transformers`` ``Qwen3NextGatedDeltaNet`` layer -> a
  mnemax ``GatedDeltaNet`` mixer.
* :mod:`mnemax.convert.xlstm`: PyPI ``xlstm`` 2.0.6 (``xLSTMLMModel``, a bare
  ``xLSTMBlockStack``, ``xLSTMLarge`` of any size).

Each converter takes a ``state_dict`` (a mapping of names to arrays: numpy arrays, torch
tensors or anything ``numpy.asarray`` reads; torch is never imported here) and the
checkpoint's config, and returns the mnemax configuration with ``{"params": ...}`` ready
for ``apply``. Every converted tree is checked against the mnemax module's own parameter
shapes; fixtures written from the official packages hold the outputs equal.
"""

from .mamba import mamba_config_from_transformers, mamba_from_transformers
from .mamba2 import mamba2_config_from_transformers, mamba2_from_transformers
from .qwen3next import conv_state_from_qwen3next, gated_deltanet_config_from_qwen3next, gated_deltanet_from_qwen3next
from .xlstm import xlstm_config_from_torch, xlstm_from_torch, xlstm_stack_config_from_torch

__all__ = [
    "conv_state_from_qwen3next",
    "gated_deltanet_config_from_qwen3next",
    "gated_deltanet_from_qwen3next",
    "mamba2_config_from_transformers",
    "mamba2_from_transformers",
    "mamba_config_from_transformers",
    "mamba_from_transformers",
    "xlstm_config_from_torch",
    "xlstm_from_torch",
    "xlstm_stack_config_from_torch",
]
