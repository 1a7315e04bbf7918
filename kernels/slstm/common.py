"""What every ``slstm`` variant shares: the state, the input checks, the GPU kernels'
configuration, and the per-step elementwise math the Pallas kernels (TPU and GPU) share.

Per batch row, head and unit (the equations of :mod:`mnemax.kernels.slstm`)::

    (i~, f~, z~, o~)_t = x_t + R h_{t-1} + b
    m_t = i~_t on a fresh state (n_{t-1} = 0), else max(log sigma(f~_t) + m_{t-1}, i~_t)
    c_t = f'_t c_{t-1} + i'_t tanh(z~_t),  n_t = f'_t n_{t-1} + i'_t,  h_t = sigma(o~_t) c_t / n_t

with ``i'_t = exp(i~_t - m_t)``, ``f'_t = exp(log sigma(f~_t) + m_{t-1} - m_t)``.
:func:`pointwise` is the step after the recurrent product, :func:`adjoint` its adjoint (the
derivative of ``max`` splits ties evenly, as ``jnp.maximum``'s does).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..checks import bool_resets, float_array, state_shapes

OP = "slstm"
F32 = jnp.float32
PRECISIONS = ("tf32x3", "tf32", "ieee")


class SLSTMState(NamedTuple):
    h: jax.Array  # (batch, heads, head_dim) hidden state (feeds the recurrent weights)
    c: jax.Array  # (batch, heads, head_dim) stabilised cell state
    n: jax.Array  # (batch, heads, head_dim) stabilised normaliser
    m: jax.Array  # (batch, heads, head_dim) log-scale stabiliser


def initial_state(batch: int, heads: int, head_dim: int, dtype=jnp.float32) -> SLSTMState:
    """The fresh (all-zero) state."""
    return SLSTMState(*(jnp.zeros((batch, heads, head_dim), dtype) for _ in range(4)))


# ----------------------------------------------------------------------------- configuration


def _power_of_two(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and not x & (x - 1)


@dataclasses.dataclass(frozen=True)
class SLSTMConfig:
    """Tuning of the Pallas GPU sLSTM kernels: a frozen, hashable value passed to
    ``slstm(..., config=)`` as a static argument (``None``: these defaults, the fastest
    measured on an H100 at batch 16, d 1024 = 4 heads of 256, benchmarks/RESULTS.md "Fused
    sLSTM on the GPU"). The TPU kernels and the other backends ignore it.

    Attributes:
      splits: programs sharing one head's recurrent matrices (None: the largest slice of at
        most 64 KB of float32 per program; a power of two leaving >= 16 units each).
      batch_block: batch rows per program (None: the batch rounded up to a power of two in
        [16, 64]).
      fwd_warps, bwd_warps: warps of the forward and backward kernels.
      precision: the recurrent products' precision, "tf32x3", "tf32" or "ieee" (None: TF32,
        or TF32x3 when ``jax.default_matmul_precision`` asks for float32, as XLA's dots would;
        interpret mode uses float32). dR (an XLA product) follows it: TF32 with "tf32",
        float32 otherwise.
      max_programs: the most programs of one launch, all resident at once (None: the GPU's
        SM count); larger problems are cut into several launches.
    """

    splits: int | None = None
    batch_block: int | None = None
    fwd_warps: int = 4
    bwd_warps: int = 4
    precision: str | None = None
    max_programs: int | None = None

    def __post_init__(self):
        def check(name, ok, allowed):
            if not ok:
                raise ValueError(f"SLSTMConfig.{name}: got {getattr(self, name)!r}; expected {allowed}")

        check("splits", self.splits is None or _power_of_two(self.splits), "None or a power of two")
        check("batch_block", self.batch_block is None or (_power_of_two(self.batch_block) and self.batch_block >= 16),
              "None or a power of two >= 16")
        for name in ("fwd_warps", "bwd_warps"):
            check(name, _power_of_two(getattr(self, name)) and getattr(self, name) <= 32, "a power of two from 1 to 32")
        check("precision", self.precision is None or self.precision in PRECISIONS, f"None or one of {PRECISIONS}")
        check("max_programs", self.max_programs is None or (
            isinstance(self.max_programs, int) and not isinstance(self.max_programs, bool) and self.max_programs >= 1),
              "None or a positive int")


# ----------------------------------------------------------------------------- checks


def validate(x, R, b, state, resets):
    """x, R, b as float arrays (b may be None) and resets as a bool array (or None);
    ValueError/TypeError naming the argument on a wrong shape or dtype."""
    x, R = float_array("x", x), float_array("R", R)
    if x.ndim != 5 or x.shape[2] != 4 or x.shape[1] < 1:
        raise ValueError(f"x must have shape (batch, time, 4, heads, head_dim) with time >= 1, got shape {x.shape}")
    batch, time, _, heads, head_dim = x.shape
    if R.shape != (heads, head_dim, 4, head_dim):
        raise ValueError(f"R must have shape (heads, head_dim, 4, head_dim) = {(heads, head_dim, 4, head_dim)}, "
                         f"got shape {R.shape}")
    if b is not None:
        b = float_array("b", b)
        if b.shape != (4, heads, head_dim):
            raise ValueError(f"b must have shape (4, heads, head_dim) = {(4, heads, head_dim)}, got shape {b.shape}")
    want = (batch, heads, head_dim)
    if state is not None:
        got = state_shapes(state)
        if got != (want,) * 4:
            raise ValueError(f"state must be (h, c, n, m), each of shape {want}, got {got}")
    return x, R, b, bool_resets(resets, batch, time)


def recurrent(R, h):
    """R h per head and gate: (batch, heads, d_in) -> (batch, 4, heads, d_out)."""
    return jnp.einsum("bhd,hdgo->bgho", h, R)


# ----------------------------------------------------------------------------- the kernels' step math


def sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def log_sigmoid(x):
    return jnp.minimum(x, 0.0) - jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


def pointwise(raw, c0, n0, m0):
    """The step's elementwise part from the gate pre-activations ``raw = (i~, f~, z~, o~)``
    and the incoming (c, n, m) (resets already applied): a dict of its intermediates,
    ``h1 c1 n1 m1`` being the new state."""
    i, f, z, o = raw
    fresh = n0 == 0.0
    a = log_sigmoid(f) + m0
    m1 = jnp.where(fresh, i, jnp.maximum(a, i))
    ia = jnp.exp(i - m1)
    fa = jnp.where(fresh, 0.0, jnp.exp(jnp.where(fresh, 0.0, a - m1)))
    tz, so = jnp.tanh(z), sigmoid(o)
    c1 = fa * c0 + ia * tz
    n1 = fa * n0 + ia
    return dict(c0=c0, n0=n0, i=i, f=f, fresh=fresh, a=a, m1=m1, ia=ia, fa=fa, tz=tz, so=so, c1=c1, n1=n1,
                h1=so * c1 / n1)


def adjoint(p, dh1, dc1, dn1, dm1):
    """The adjoint of :func:`pointwise`: from the gradients of the new (h, c, n, m) to those
    of the gate pre-activations (a list of 4) and of the incoming (c, n, m)."""
    c0, n0, i, f, fresh, a, ia, fa, tz, so, c1, n1 = (
        p[k] for k in ("c0", "n0", "i", "f", "fresh", "a", "ia", "fa", "tz", "so", "c1", "n1"))
    do = dh1 * (c1 / n1) * so * (1.0 - so)
    dc1 = dc1 + dh1 * so / n1
    dn1 = dn1 - dh1 * so * c1 / (n1 * n1)
    dfa = jnp.where(fresh, 0.0, (dc1 * c0 + dn1 * n0) * fa)  # d/d(a - m1) through f'
    dia = (dc1 * tz + dn1) * ia  # d/d(i - m1) through i'
    dz = dc1 * ia * (1.0 - tz * tz)
    dm1 = dm1 - dia - dfa
    share_a = jnp.where(fresh, 0.0, jnp.where(a > i, 1.0, jnp.where(a < i, 0.0, 0.5)))
    da = dfa + share_a * dm1
    di = dia + (1.0 - share_a) * dm1
    df = da * sigmoid(-f)
    return [di, df, dz, do], (dc1 * fa, dn1 * fa, da)


def pad(x, axis, size):
    """``x`` zero-padded at the end of ``axis`` to ``size``."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)
