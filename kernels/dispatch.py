"""Backend choice for the scan and recurrence ops.

Each op package (``kernels/<op>/``) has one signature and several backends, listed in
an immutable table its ``__init__`` builds once with :func:`backends`:

* ``reference``  -- a plainly sequential ``lax.scan`` in float32: the ground truth.
* ``xla``        -- portable parallel forms (``lax.associative_scan``, chunked matmuls).
* ``pallas_gpu`` -- Pallas kernels for NVIDIA GPUs.
* ``pallas_tpu`` -- Pallas Mosaic TPU kernels.

``backend=None`` picks by ``jax.default_backend()``: the first backend of the op's table
in ``DEFAULT_ORDER[platform]`` that is not opt-in. The environment variable
``MNEMAX_KERNEL_BACKEND`` overrides the platform default (an explicit ``backend=``
argument still wins).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Mapping

import jax

BACKENDS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
ENV_VAR = "MNEMAX_KERNEL_BACKEND"

# Preferred backends per platform, best first; the first one registered for an op wins.
DEFAULT_ORDER: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "gpu": ("pallas_gpu", "xla"),
    "cuda": ("pallas_gpu", "xla"),
    "rocm": ("xla",),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
})


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


def backends(op: str, impls: Mapping[str, Callable], *, opt_in: frozenset[str] = frozenset()) -> Backends:
    """An op's backend table: ``impls`` maps backend names (of ``BACKENDS``) to
    implementations; backends in ``opt_in`` run only when asked for by name. Immutable,
    built once by the op's package."""
    bad = sorted(set(impls) - set(BACKENDS))
    if bad:
        raise ValueError(f"{op}: backend names must be among {BACKENDS}, got {bad}")
    return Backends(op, types.MappingProxyType(dict(impls)), frozenset(opt_in))


class Backends:
    """One op's backends (see :func:`backends`): ``available()``, ``default(platform)`` and
    ``resolve(backend) -> (name, implementation)``."""

    __slots__ = ("op", "impls", "opt_in")

    def __init__(self, op: str, impls: Mapping[str, Callable], opt_in: frozenset[str]):
        self.op, self.impls, self.opt_in = op, impls, opt_in

    def available(self) -> tuple[str, ...]:
        return tuple(b for b in BACKENDS if b in self.impls)

    def default(self, platform: str | None = None) -> str:
        env = os.environ.get(ENV_VAR)
        if env:
            if env not in self.impls:
                raise ValueError(f"{ENV_VAR}={env!r} names no backend of {self.op!r}; expected one of {self.available()}")
            return env
        platform = platform or jax.default_backend()
        for name in DEFAULT_ORDER.get(platform, ("xla",)):
            if name in self.impls and name not in self.opt_in:
                return name
        return "reference"

    def resolve(self, backend: str | None) -> tuple[str, Callable]:
        name = self.default() if backend is None else backend
        if name not in self.impls:
            raise ValueError(f"backend must be one of {self.available()} for {self.op!r}, got {backend!r}")
        return name, self.impls[name]
