"""The built-in families, one module each: its typed block config, block builder and
presets. Importing this package registers them all (``mnemax`` does)."""

from . import elm, gated_deltanet, hcam, hopfield, lssl, mamba, mamba2, memmamba, s4d, transformer, xlstm, xlstm_large
from .elm import ELMConfig
from .gated_deltanet import GatedDeltaNetConfig
from .hcam import HCAMConfig
from .hopfield import HopfieldConfig
from .lssl import LSSLConfig
from .mamba import MambaConfig
from .mamba2 import Mamba2Config
from .memmamba import MemMambaConfig, MemMambaModel
from .s4d import S4DConfig
from .transformer import TransformerConfig
from .xlstm import XLSTMConfig
from .xlstm_large import XLSTMLargeConfig

__all__ = [
    "ELMConfig",
    "GatedDeltaNetConfig",
    "HCAMConfig",
    "HopfieldConfig",
    "LSSLConfig",
    "Mamba2Config",
    "MambaConfig",
    "MemMambaConfig",
    "MemMambaModel",
    "S4DConfig",
    "TransformerConfig",
    "XLSTMConfig",
    "XLSTMLargeConfig",
    "elm",
    "gated_deltanet",
    "hcam",
    "hopfield",
    "lssl",
    "mamba",
    "mamba2",
    "memmamba",
    "s4d",
    "transformer",
    "xlstm",
    "xlstm_large",
]
