"""The built-in families, one module each: its typed block config, block builder and
presets. Importing this package registers them all (``mnemax`` does)."""

from . import (
    deltanet,
    elm,
    gated_deltanet,
    gla,
    hcam,
    hopfield,
    kda,
    lightning,
    lssl,
    mamba,
    mamba2,
    memmamba,
    retnet,
    s4d,
    transformer,
    xlstm,
    xlstm_large,
)
from .deltanet import DeltaNetConfig
from .elm import ELMConfig
from .gated_deltanet import GatedDeltaNetConfig
from .gla import GLAConfig
from .hcam import HCAMConfig
from .hopfield import HopfieldConfig
from .kda import KDAConfig
from .lightning import LightningConfig
from .lssl import LSSLConfig
from .mamba import MambaConfig
from .mamba2 import Mamba2Config
from .memmamba import MemMambaConfig, MemMambaModel
from .retnet import RetNetConfig
from .s4d import S4DConfig
from .transformer import TransformerConfig
from .xlstm import XLSTMConfig
from .xlstm_large import XLSTMLargeConfig

__all__ = [
    "DeltaNetConfig",
    "ELMConfig",
    "GLAConfig",
    "GatedDeltaNetConfig",
    "HCAMConfig",
    "HopfieldConfig",
    "KDAConfig",
    "LSSLConfig",
    "LightningConfig",
    "Mamba2Config",
    "MambaConfig",
    "MemMambaConfig",
    "MemMambaModel",
    "RetNetConfig",
    "S4DConfig",
    "TransformerConfig",
    "XLSTMConfig",
    "XLSTMLargeConfig",
    "deltanet",
    "elm",
    "gated_deltanet",
    "gla",
    "hcam",
    "hopfield",
    "kda",
    "lightning",
    "lssl",
    "mamba",
    "mamba2",
    "memmamba",
    "retnet",
    "s4d",
    "transformer",
    "xlstm",
    "xlstm_large",
]
