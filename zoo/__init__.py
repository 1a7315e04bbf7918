"""mnemax: a JAX research zoo of memory architectures.

Front door::

    import mnemax
    mnemax.list_models()                      # registered presets
    model = mnemax.create("transformer-tiny") # a flax module on the layer contract
    params = model.init(key, tokens)
    logits, state = model.apply(params, tokens)

Subpackages: :mod:`mnemax.layers` (sequence mixers and shared pieces),
:mod:`mnemax.kernels` (scan ops with reference/XLA/Pallas backends),
:mod:`mnemax.train` (trainer; needs the ``train`` extras), :mod:`mnemax.configs`.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .config import ModelConfig
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
)

try:
    __version__ = _version("mnemax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "Family",
    "ModelConfig",
    "ModelState",
    "PoolState",
    "SequenceModel",
    "build",
    "create",
    "get_config",
    "get_family",
    "list_families",
    "list_models",
    "register_family",
    "register_preset",
]

from .release import ReleaseError, load_pretrained, save_pretrained  # noqa: E402

__all__ += ["ReleaseError", "load_pretrained", "save_pretrained"]
