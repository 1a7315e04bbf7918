"""Backend dispatch for the scan and recurrence ops.

Each op (``linear_scan``, later ``selective_scan``, ``mlstm``, ``slstm``) has one
signature and several backends registered here:

* ``reference``  -- a plainly sequential ``lax.scan`` in float32: the ground truth.
* ``xla``        -- portable parallel forms (``lax.associative_scan``, chunked matmuls).
* ``pallas_gpu`` -- Pallas kernels for NVIDIA GPUs (registered by later modules).
* ``pallas_tpu`` -- Pallas Mosaic TPU kernels (registered by later modules).

``backend=None`` picks by ``jax.default_backend()``: the first registered backend of
``DEFAULT_ORDER[platform]``. The environment variable ``MNEMAX_KERNEL_BACKEND``
overrides the platform default (an explicit ``backend=`` argument still wins).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax

BACKENDS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
ENV_VAR = "MNEMAX_KERNEL_BACKEND"

# Preferred backends per platform, best first; the first one registered for an op wins.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "gpu": ("pallas_gpu", "xla"),
    "cuda": ("pallas_gpu", "xla"),
    "rocm": ("xla",),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}

_REGISTRY: dict[str, dict[str, Callable]] = {}
# (op, backend) pairs that run only when asked for by name (not yet checked on hardware).
_OPT_IN: set[tuple[str, str]] = set()


def register(op: str, backend: str, *, default: bool = True) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``. With
    ``default=False`` the backend is never picked by ``backend=None`` (only by name or
    ``MNEMAX_KERNEL_BACKEND``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        if not default:
            _OPT_IN.add((op, backend))
        return fn

    return deco


def available(op: str) -> tuple[str, ...]:
    """The backends registered for ``op``, in ``BACKENDS`` order."""
    impls = _REGISTRY.get(op, {})
    return tuple(b for b in BACKENDS if b in impls)


def default_backend(op: str, platform: str | None = None) -> str:
    """The backend ``backend=None`` resolves to for ``op`` on ``platform``."""
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in _REGISTRY.get(op, {}):
            raise ValueError(
                f"{ENV_VAR}={env!r} names no backend of {op!r}; "
                f"expected one of {available(op)}"
            )
        return env
    platform = platform or jax.default_backend()
    for name in DEFAULT_ORDER.get(platform, ("xla",)):
        if name in _REGISTRY.get(op, {}) and (op, name) not in _OPT_IN:
            return name
    return "reference"


# Mesh axes (mnemax.sharding) that split the batch, and the one that splits channels/heads.
BATCH_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"


def mesh_split(batch: int, channels: int | None = None):
    """``(batch_axes, channel_axis)`` of the mesh context (``jax.set_mesh`` /
    ``use_abstract_mesh``) that divide ``batch`` / ``channels``; None where nothing splits.

    A ``pallas_call`` is opaque to XLA's SPMD partitioner, which replicates it (every
    device then runs the whole batch); kernels run per shard under ``jax.shard_map``
    over these axes instead."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    rows = (axes if len(axes) > 1 else axes[0]) if axes and batch % n == 0 else None
    tp = mesh.shape[TENSOR_AXIS] if TENSOR_AXIS in mesh.axis_names else 1
    cols = TENSOR_AXIS if channels is not None and tp > 1 and channels % tp == 0 else None
    return rows, cols


def gpu_sm_count() -> int:
    """The first GPU's SM count; an H100's 132 where there is no GPU runtime (lowering or
    interpret mode on a CPU machine), so kernel layouts chosen by it stay testable there."""
    try:
        return int(jax.devices("gpu")[0].core_count)
    except Exception:  # noqa: BLE001 - no GPU backend at all raises RuntimeError, others vary
        return 132


INTERPRET_ENV_VAR = "MNEMAX_PALLAS_INTERPRET"


def interpret_flag(interpret: bool | None) -> bool:
    """``interpret`` if given, else whether ``MNEMAX_PALLAS_INTERPRET`` is set to 1/true."""
    if interpret is not None:
        return bool(interpret)
    return os.environ.get(INTERPRET_ENV_VAR, "").lower() in ("1", "true", "yes")


def resolve(op: str, backend: str | None) -> tuple[str, Callable]:
    """Returns ``(name, implementation)`` of ``op`` for ``backend`` (None: the default)."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    name = default_backend(op) if backend is None else backend
    impls = _REGISTRY[op]
    if name not in impls:
        raise ValueError(
            f"backend must be one of {available(op)} for {op!r}, got {backend!r}"
        )
    return name, impls[name]
