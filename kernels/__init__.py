"""mnemax.kernels: scan and recurrence ops with swappable backends.

See :mod:`mnemax.kernels.dispatch` for how a backend is chosen.
"""

from . import dispatch
from .dispatch import available, default_backend
from .linear_scan import linear_scan
from .mlstm import MLSTMState, mlstm
from .selective_scan import selective_scan
from .slstm import SLSTMState, slstm

__all__ = [
    "MLSTMState", "SLSTMState", "available", "default_backend", "dispatch", "linear_scan", "mlstm", "selective_scan", "slstm",
]
