"""mnemax.kernels: scan and recurrence ops with swappable backends, one package per op.

``kernels/<op>/`` holds the op's sequential reference, its XLA form, its Pallas GPU and
TPU kernels and, in ``__init__``, the public function, its custom VJP and its backend
table (see :mod:`mnemax.kernels.dispatch`). Kernel tuning is a frozen config passed as
``config=``; which mesh axes split a Pallas call is a :class:`KernelSharding` passed as
``sharding=`` (see :mod:`mnemax.kernels.sharding`).
"""

import types

from . import delta_rule as _delta_rule_pkg
from . import dispatch
from . import gated_linear_attention as _gla_pkg
from . import linear_scan as _linear_scan_pkg
from . import mlstm as _mlstm_pkg
from . import selective_scan as _selective_scan_pkg
from . import slstm as _slstm_pkg
from .delta_rule import delta_rule
from .gated_linear_attention import gated_linear_attention
from .linear_scan import linear_scan
from .mlstm import MLSTMConfig, MLSTMState, mlstm
from .selective_scan import selective_scan
from .sharding import KernelSharding
from .slstm import SLSTMConfig, SLSTMState, slstm

OPS = types.MappingProxyType({
    "linear_scan": _linear_scan_pkg.BACKENDS,
    "selective_scan": _selective_scan_pkg.BACKENDS,
    "mlstm": _mlstm_pkg.BACKENDS,
    "slstm": _slstm_pkg.BACKENDS,
    "gated_linear_attention": _gla_pkg.BACKENDS,
    "delta_rule": _delta_rule_pkg.BACKENDS,
})


def _table(op: str) -> dispatch.Backends:
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    return OPS[op]


def available(op: str) -> tuple[str, ...]:
    """The backends of ``op`` ("selective_scan", ...), in ``dispatch.BACKENDS`` order."""
    return _table(op).available()


def default_backend(op: str, platform: str | None = None) -> str:
    """The backend ``backend=None`` resolves to for ``op`` on ``platform`` (default: this one)."""
    return _table(op).default(platform)


__all__ = [
    "OPS", "KernelSharding", "MLSTMConfig", "MLSTMState", "SLSTMConfig", "SLSTMState", "available", "default_backend",
    "delta_rule", "dispatch", "gated_linear_attention", "linear_scan", "mlstm", "selective_scan", "slstm",
]
