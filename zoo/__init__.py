"""mnemax: a JAX research zoo of memory architectures.

Front door::

    import mnemax
    mnemax.list_models()                      # registered presets
    mnemax.list_families()                    # registered families
    model = mnemax.create("transformer-tiny") # a flax module on the layer contract
    params = model.init(key, tokens)
    logits, state = model.apply(params, tokens)

A family lives in :mod:`mnemax.families` (its typed config, block builder and presets)
and registers itself in :mod:`mnemax.registry`. Subpackages: :mod:`mnemax.layers`
(sequence mixers and shared pieces), :mod:`mnemax.kernels` (scan ops with
reference/XLA/Pallas backends), :mod:`mnemax.train` (trainer; needs the ``train``
extras), :mod:`mnemax.configs`.
"""

from . import families
from .config import BlockConfig, ModelConfig
from .model import ModelState, PoolState, SequenceModel
from .registry import (
    Family,
    build,
    create,
    get_config,
    get_family,
    list_families,
    list_models,
    register_family,
    register_preset,
    tiny_preset,
)
from .release import ReleaseError, load_pretrained, save_pretrained
from .version import __version__

__all__ = [
    "BlockConfig",
    "Family",
    "ModelConfig",
    "ModelState",
    "PoolState",
    "ReleaseError",
    "SequenceModel",
    "__version__",
    "build",
    "create",
    "families",
    "get_config",
    "get_family",
    "list_families",
    "list_models",
    "load_pretrained",
    "register_family",
    "register_preset",
    "save_pretrained",
    "tiny_preset",
]
