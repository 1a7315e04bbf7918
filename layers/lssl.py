"""Linear State-Space Layers (LSSL) and the HiPPO machinery they are built from.

Gu et al., "Combining Recurrent, Convolutional, and Continuous-time Models with Linear
State-Space Layers" (NeurIPS 2021); HiPPO matrices from Gu et al., "HiPPO: Recurrent
Memory with Optimal Polynomial Projections" (NeurIPS 2020).

Continuous system per feature h (H of them, each with N states)::

    x'(t) = A x(t) + B u(t),      y(t) = C x(t) + D u(t)

discretised with step ``dt_h`` (learned, log-uniform init in [dt_min, dt_max]) by the
generalised bilinear transform (GBT)::

    Abar = (I - alpha dt A)^-1 (I + (1 - alpha) dt A),   Bbar = dt (I - alpha dt A)^-1 B

(alpha = 0 forward Euler, 1/2 bilinear/Tustin, 1 backward Euler) or by zero-order hold
(ZOH: Abar = exp(dt A), Bbar = A^-1 (exp(dt A) - I) B, computed as the exponential of
the block matrix [[dt A, dt B], [0, 0]] so that a singular A is fine). Then

    recurrent view:     x_t = Abar x_{t-1} + Bbar u_t,   y_t = C x_t + D u_t
    convolutional view: y = K * u + D u,   K = (C Bbar, C Abar Bbar, ..., C Abar^(L-1) Bbar)

and, with an incoming state x_{-1}, the convolutional view adds ``C Abar^(t+1) x_{-1}``.
K and these terms come from Krylov sequences computed by repeated squaring
(:func:`krylov`, log2(L) matrix products); the convolution runs as an FFT.

HiPPO matrices (:func:`hippo`): ``legs`` (scaled Legendre: the state holds the Legendre
coefficients of the whole history), ``legt`` (translated Legendre: a sliding window of
length 2 in continuous time), ``lagt`` (translated Laguerre).

:func:`legs_memory` runs the time-varying HiPPO-LegS recurrence (``c' = (A c + B f)/t``,
step k discretised with dt = 1/k), and :func:`reconstruct` evaluates a state's
Legendre expansion, so that a memory's history can be read back from its state.

The layer (the reference code's ``LSSL``/``Platypus`` layout): H independent N-state
systems with per-feature dt, A and B fixed to the HiPPO matrix (``learn=0``) or trained
from it (``learn=1`` shared, ``learn=2`` one per feature), C (H, M, N) and D (H, M)
random normal for M output channels per feature, then an activation and a linear
output mixing (H * M -> H)::

    y, state = LSSL(features=H, state_size=N, channels=M)(u, state, resets)
    u, y: (batch, time, H);  state: LSSLState(x=(batch, H, N)) float32

Views: ``mode="conv"`` (FFT convolution, for training), ``mode="recurrent"``
(``lax.scan``, for stepping), ``mode="auto"`` (conv unless ``resets`` is given or the
call is at most ``AUTO_RECURRENT_STEPS`` steps long, as generation's one-token steps are).
With ``resets`` the layer always runs the recurrent view: a reset cuts the kernel at
the episode boundary, which one FFT over the whole sequence cannot do. Both views
return the state after the last step, so they can be mixed freely (the reference code
never implemented the step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .base import (
    Dtype,
    check_resets,
    check_sequence,
    check_state,
    compute_dtype,
    expected_state,
    partitioned,
    state_dtype,
)

MEASURES = ("legs", "legt", "lagt")
METHODS = ("zoh", "bilinear", "gbt", "forward_euler", "backward_euler")
ACTIVATIONS = ("gelu", "none")
MODES = ("auto", "conv", "recurrent")
# Under mode="auto", calls of at most this many steps run the recurrent view: a generation
# step is then one (H, N, N) mat-vec, where the conv view builds Krylov powers, runs two
# FFTs and, from a state, a matrix power and a second Krylov sequence (lssl-125m generated
# 4.6x slower than s4d-125m per token on an H100 that way; benchmarks/RESULTS.md).
AUTO_RECURRENT_STEPS = 16
# The variable collection that can hold each layer's discretised (Abar, Bbar): every call
# otherwise rediscretises from the parameters (one N x N solve per feature), which is most
# of a generation step. Filled by :func:`cache_discretized`; used whenever present.
DISCRETIZED = "discretized"
# The conv view's Krylov powers (H, L, N) are built for at most this many elements at a time:
# above it the features go in groups (lax.map, each group rematerialised in the backward), so
# a long training context does not hold the whole (H, L, N) stack and its cotangent. lssl-125m
# at 2 x 8192 compiled (CPU) to 56.1 GB of temporaries with remat, the stack being 1.6 GB
# per layer and copy; the threshold keeps 2k contexts (100 M elements at H 768, N 64) as they were.
KRYLOV_GROUP_ELEMS = 1 << 27


def cache_discretized(module: nn.Module, variables, *args, **kwargs):
    """``variables`` plus the ``"discretized"`` collection: each LSSL layer's (Abar, Bbar)
    computed once from ``variables["params"]`` (one call of ``module`` on ``args``, e.g. a
    (batch, 1) input), so later calls (generation steps) skip the discretisation. Modules
    without LSSL layers return ``variables`` unchanged. The cache belongs to those
    parameters: rebuild it after they change (never train with it: the gradient would not
    reach ``log_dt``, ``A`` or ``B``)."""
    _, new = module.apply(variables, *args, mutable=[DISCRETIZED], **kwargs)
    return {**variables, **new} if new.get(DISCRETIZED) else variables


# ----------------------------------------------------------------------------- HiPPO


def hippo(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """The HiPPO transition ``(A (N, N), B (N,))`` in float64 (sign convention x' = A x + B u).

    * ``legs``: A[n, k] = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k);
      B[n] = sqrt(2n+1).
    * ``legt``: A[n, k] = -(1/2) sqrt(2n+1) sqrt(2k+1) (1 if n >= k else (-1)^(n-k));
      B[n] = (1/2) sqrt(2n+1)  (uniform measure on the window [t - 2, t]).
    * ``lagt``: A[n, k] = -1 (n > k), -1/2 (n = k), 0 (n < k); B[n] = 1.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    if N < 1:
        raise ValueError(f"N must be >= 1, got {N}")
    n = np.arange(N, dtype=np.float64)
    r = np.sqrt(2 * n + 1)
    row, col = n[:, None], n[None, :]
    if measure == "legs":
        A = -np.where(row > col, r[:, None] * r[None, :], np.where(row == col, row + 1, 0.0))
        B = r.copy()
    elif measure == "legt":
        sign = np.where(row >= col, 1.0, (-1.0) ** (row - col))
        A = -0.5 * r[:, None] * r[None, :] * sign
        B = 0.5 * r
    else:
        A = np.eye(N) / 2 - np.tril(np.ones((N, N)))
        B = np.ones(N)
    return A, B


def discretize(A, B, dt, method: str = "bilinear", alpha: float | None = None):
    """Discrete ``(Abar, Bbar)`` of ``x' = A x + B u`` with step ``dt`` (see module docstring).

    Args:
      A: (..., N, N); B: (..., N); dt: scalar or (...); the leading dims broadcast.
      method: ``"zoh"``, ``"bilinear"`` (GBT alpha 1/2), ``"gbt"`` (give ``alpha``),
        ``"forward_euler"`` (alpha 0) or ``"backward_euler"`` (alpha 1).

    Returns:
      Abar (..., N, N), Bbar (..., N) in the promoted dtype of the inputs.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    A, B, dt = jnp.asarray(A), jnp.asarray(B), jnp.asarray(dt)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2] or B.shape[-1:] != A.shape[-1:]:
        raise ValueError(f"A must be (..., N, N) and B (..., N), got shapes {A.shape} and {B.shape}")
    N = A.shape[-1]
    batch = jnp.broadcast_shapes(A.shape[:-2], B.shape[:-1], dt.shape)
    dtype = jnp.promote_types(jnp.result_type(A, B, dt), jnp.float32)
    A = jnp.broadcast_to(A, batch + (N, N)).astype(dtype)
    B = jnp.broadcast_to(B, batch + (N,)).astype(dtype)
    dt = jnp.broadcast_to(dt, batch).astype(dtype)[..., None, None]
    if method == "zoh":
        top = jnp.concatenate([dt * A, dt * B[..., None]], axis=-1)  # (..., N, N + 1)
        block = jnp.concatenate([top, jnp.zeros(batch + (1, N + 1), dtype)], axis=-2)
        E = jax.scipy.linalg.expm(block)
        return E[..., :N, :N], E[..., :N, N]
    if method == "gbt":
        if alpha is None:
            raise ValueError("method='gbt' needs alpha (0 forward Euler, 0.5 bilinear, 1 backward Euler), got None")
    else:
        alpha = {"bilinear": 0.5, "forward_euler": 0.0, "backward_euler": 1.0}[method]
    eye = jnp.eye(N, dtype=dtype)
    lhs = eye - alpha * dt * A
    rhs = jnp.concatenate([eye + (1.0 - alpha) * dt * A, dt * B[..., None]], axis=-1)
    sol = jnp.linalg.solve(lhs, rhs)
    return sol[..., :N], sol[..., N]


def krylov(L: int, A, b):
    """The Krylov sequence ``(b, A b, A^2 b, ..., A^(L-1) b)`` by repeated squaring.

    A: (..., N, N); b: (..., N) broadcasting against A's leading dims. Returns
    (..., L, N), using ceil(log2 L) matrix squarings.
    """
    x = b[..., None, :]
    power = A
    while x.shape[-2] < L:
        x = jnp.concatenate([x, jnp.einsum("...nm,...lm->...ln", power, x)], axis=-2)
        if x.shape[-2] < L:
            power = power @ power
    return x[..., :L, :]


# ----------------------------------------------------------------------------- memory


def legendre_basis(N: int, x) -> np.ndarray:
    """(len(x), N): ``sqrt(2n+1) P_n(x)`` for x in [-1, 1] (three-term recurrence, float64)."""
    x = np.asarray(x, np.float64)
    P = np.zeros(x.shape + (N,))
    P[..., 0] = 1.0
    if N > 1:
        P[..., 1] = x
    for n in range(1, N - 1):
        P[..., n + 1] = ((2 * n + 1) * x * P[..., n] - n * P[..., n - 1]) / (n + 1)
    return P * np.sqrt(2 * np.arange(N) + 1)


def reconstruct(c, s):
    """Reads a LegS/LegT memory back: ``f(s) ~ sum_n c_n sqrt(2n+1) P_n(2 s - 1)``.

    ``s`` in [0, 1] is the position in the memory's window: 0 the oldest point (time 0
    for LegS, t - 2 for LegT), 1 the newest. c: (..., N); returns (..., len(s)).
    """
    basis = legendre_basis(c.shape[-1], 2 * np.asarray(s, np.float64) - 1)
    return c @ jnp.asarray(basis.T, c.dtype)


def legs_memory(u, N: int, method: str = "bilinear"):
    """The scaled HiPPO-LegS memory of a signal: ``c_k = Abar_k c_{k-1} + Bbar_k u_k`` with
    ``(Abar_k, Bbar_k) = discretize(A, B, 1/k, method)`` (A, B = ``hippo('legs', N)``).

    u: (..., L) samples u_1..u_L; returns the states after each step, (..., L, N), in
    float64 when x64 is on, else float32. After step k, ``reconstruct(c_k, s)`` reads
    back u at time s * k.
    """
    A, B = hippo("legs", N)
    u = jnp.asarray(u)
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    A, B = jnp.asarray(A, dtype), jnp.asarray(B, dtype)
    steps = jnp.arange(1, u.shape[-1] + 1, dtype=dtype)

    def step(c, inputs):
        k, u_k = inputs
        Ab, Bb = discretize(A, B, 1.0 / k, method)
        c = jnp.einsum("nm,...m->...n", Ab, c) + Bb * u_k[..., None]
        return c, c

    c0 = jnp.zeros(u.shape[:-1] + (N,), dtype)
    _, cs = lax.scan(step, c0, (steps, jnp.moveaxis(u.astype(dtype), -1, 0)))
    return jnp.moveaxis(cs, 0, -2)


# ----------------------------------------------------------------------------- layer


def check_call(layer: nn.Module, x, state, resets):
    """Validates a contract call of an SSM layer with ``features`` and ``_check_config``:
    x (batch, time, features), resets (batch, time) and the state's shapes. Returns resets."""
    layer._check_config()
    check_sequence(x, layer.features, name="x")
    resets = check_resets(resets, x.shape[0], x.shape[1])
    if state is not None:
        check_state(state, expected_state(layer, x.shape[0]))
    return resets


class LSSLState(NamedTuple):
    x: jax.Array  # (batch, H, N): the state after the last step


def log_uniform_dt(dt_min: float, dt_max: float):
    """Init of log(dt): uniform in [log dt_min, log dt_max]."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))

    return init


def causal_fft_conv(u, k):
    """y[b, t, h, m] = sum_{s <= t} k[h, m, t - s] u[b, s, h]. u: (batch, L, H); k: (H, M, L).

    One forward FFT over the rows of u and k together and one inverse FFT, so a layer never
    has two FFTs in flight and a stack's FFTs run one after another (each depends on the
    layer's input). Two FFTs running at once could deadlock XLA's CPU runtime on a 2-core
    machine (both threads of its pool inside an FFT, each waiting for the other's share of
    the pool): seen with jax 0.11.2 evaluating an LSSL at twice its training length."""
    b, L, H = u.shape
    M = k.shape[1]
    n = 1 << (2 * L - 1).bit_length()
    dt = jnp.result_type(u.dtype, k.dtype, jnp.float32)  # 16-bit inputs transform in float32
    rows = jnp.concatenate([jnp.moveaxis(u, 1, 2).reshape(b * H, L).astype(dt), k.reshape(H * M, L).astype(dt)], axis=0)
    spec = jnp.fft.rfft(rows, n=n, axis=-1)  # (b H + H M, F)
    U, Kf = spec[: b * H].reshape(b, H, 1, -1), spec[b * H:].reshape(1, H, M, -1)
    y = jnp.fft.irfft(U * Kf, n=n, axis=-1)[..., :L]  # (b, H, M, L)
    return jnp.transpose(y, (0, 3, 1, 2)).astype(u.dtype)


class LSSL(nn.Module):
    """Linear State-Space Layer (see module docstring for equations and shapes).

    Attributes:
      features: H, the width of inputs and outputs.
      state_size: N, the order of the HiPPO projection.
      channels: M, output channels per feature (mixed back to H by the output linear).
      measure, method, alpha: the HiPPO matrix and discretisation.
      dt_min, dt_max: range of the log-uniform dt init.
      learn: 0 A, B fixed; 1 trained, shared by all features; 2 trained, one per feature.
      activation: ``"gelu"`` or ``"none"`` before the output mixing.
      mode: ``"auto"`` (recurrent with ``resets`` or for calls of at most
        ``AUTO_RECURRENT_STEPS`` steps, conv otherwise), ``"conv"`` or ``"recurrent"``.
    """

    features: int
    state_size: int = 64
    channels: int = 1
    measure: str = "legs"
    method: str = "bilinear"
    alpha: float = 0.5
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    learn: int = 0
    activation: str = "gelu"
    mode: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _check_config(self):
        if self.learn not in (0, 1, 2):
            raise ValueError(f"learn must be 0 (fixed), 1 (shared) or 2 (per feature), got {self.learn!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.state_size < 1 or self.channels < 1:
            raise ValueError(f"state_size and channels must be >= 1, got {self.state_size}, {self.channels}")

    def initial_state(self, batch_size: int) -> LSSLState:
        return LSSLState(jnp.zeros((batch_size, self.features, self.state_size), state_dtype(self.dtype)))

    def _system(self, cdt):
        """Discrete (Abar (H, N, N), Bbar (H, N)), C (H, M, N), D (H, M) in the compute dtype."""
        H, N, M = self.features, self.state_size, self.channels
        A0, B0 = hippo(self.measure, N)
        if self.learn:
            lead = (H,) if self.learn == 2 else ()
            names = ("embed",) if self.learn == 2 else ()
            A = self.param("A", partitioned(lambda k, s, d: jnp.broadcast_to(jnp.asarray(A0, d), s), names + (None, None)), lead + (N, N), self.param_dtype)
            B = self.param("B", partitioned(lambda k, s, d: jnp.broadcast_to(jnp.asarray(B0, d), s), names + (None,)), lead + (N,), self.param_dtype)
        else:
            A, B = jnp.asarray(A0), jnp.asarray(B0)
        log_dt = self.param("log_dt", partitioned(log_uniform_dt(self.dt_min, self.dt_max), ("embed",)), (H,), self.param_dtype)
        C = self.param("C", partitioned(nn.initializers.normal(1.0), ("embed", None, "state")), (H, M, N), self.param_dtype)
        D = self.param("D", partitioned(nn.initializers.normal(1.0), ("embed", None)), (H, M), self.param_dtype)
        if self.has_variable(DISCRETIZED, "Abar"):  # the cached system (see cache_discretized)
            Abar, Bbar = (self.get_variable(DISCRETIZED, k).astype(cdt) for k in ("Abar", "Bbar"))
        else:
            Abar, Bbar = discretize(A.astype(cdt), B.astype(cdt), jnp.exp(log_dt.astype(cdt)), self.method, self.alpha)
            if self.is_mutable_collection(DISCRETIZED) and not self.is_initializing():
                self.put_variable(DISCRETIZED, "Abar", Abar)
                self.put_variable(DISCRETIZED, "Bbar", Bbar)
        return Abar, Bbar, C.astype(cdt), D.astype(cdt)

    @nn.compact
    def __call__(self, u, state: LSSLState | None = None, resets=None):
        resets = check_call(self, u, state, resets)
        batch, time, H = u.shape
        cdt = compute_dtype(self.dtype, u)
        sdt = state_dtype(self.dtype)
        ssm_dt = jnp.promote_types(cdt, jnp.float32)  # the SSM itself runs in float32 (float64)
        Abar, Bbar, C, D = self._system(ssm_dt)
        u = u.astype(ssm_dt)
        x0 = None if state is None else state.x.astype(ssm_dt)
        recurrent = self.mode == "recurrent" or (self.mode == "auto" and (resets is not None or time <= AUTO_RECURRENT_STEPS))
        if recurrent or resets is not None:
            y, x_last = self._recurrent(u, x0, resets, Abar, Bbar, C)
        else:
            y, x_last = self._convolutional(u, x0, Abar, Bbar, C)
        y = y + u[..., None] * D  # (batch, time, H, M)
        y = y.reshape(batch, time, H * self.channels)
        if self.activation == "gelu":
            y = jax.nn.gelu(y, approximate=False)
        y = nn.Dense(
            H, dtype=cdt, param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (None, "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="output_linear",
        )(y.astype(cdt))
        return y, LSSLState(x_last.astype(sdt))

    @staticmethod
    def _recurrent(u, x0, resets, Abar, Bbar, C):
        batch, time, H = u.shape
        x = jnp.zeros((batch, H, Abar.shape[-1]), u.dtype) if x0 is None else x0
        cut = jnp.zeros((batch, time), bool) if resets is None else resets

        def step(x, inputs):
            u_t, cut_t = inputs
            x = jnp.where(cut_t[:, None, None], jnp.zeros_like(x), x)
            x = jnp.einsum("hnm,bhm->bhn", Abar, x) + Bbar * u_t[..., None]
            return x, jnp.einsum("hkn,bhn->bhk", C, x)

        x, ys = lax.scan(step, x, (jnp.moveaxis(u, 1, 0), jnp.moveaxis(cut, 1, 0)))
        return jnp.moveaxis(ys, 0, 1), x

    @staticmethod
    def _kernel_and_last(u, Abar, Bbar, C):
        """The conv kernel K (H, M, L) and the input's part of the final state (batch, H, N),
        ``sum_s Abar^(L-1-s) Bbar u_s``, from the Krylov powers ``Abar^l Bbar``; in feature
        groups when (H, L, N) exceeds ``KRYLOV_GROUP_ELEMS``."""
        time, (H, N) = u.shape[1], Bbar.shape

        def group(args):  # (..., N, N), (..., N), (..., M, N), (..., batch, L)
            A, B, Cg, ug = args
            powers_b = krylov(time, A, B)  # (..., L, N): Abar^l Bbar
            return (jnp.einsum("...kn,...ln->...kl", Cg, powers_b),
                    jnp.einsum("...ln,...bl->...bn", powers_b[..., ::-1, :], ug))

        args = (Abar, Bbar, C, jnp.moveaxis(u, 2, 0))  # u as (H, batch, L)
        per = max(1, KRYLOV_GROUP_ELEMS // (time * N))
        if per >= H:
            K, last = group(args)
        else:
            K, last = lax.map(jax.checkpoint(group), args, batch_size=per)
        return K, jnp.moveaxis(last, 0, 1)

    @staticmethod
    def _convolutional(u, x0, Abar, Bbar, C):
        time = u.shape[1]
        K, x_last = LSSL._kernel_and_last(u, Abar, Bbar, C)  # (H, M, L), (batch, H, N)
        y = causal_fft_conv(u, K)
        # final state: x_{L-1} = Abar^L x0 + sum_s Abar^(L-1-s) Bbar u_s
        if x0 is not None:
            AT = jnp.swapaxes(Abar, -1, -2)
            # rows C Abar^(t+1) = ((A^T)^t (A^T C^T))^T: (H, M, L, N)
            CA = krylov(time, AT[:, None], jnp.einsum("hnm,hkn->hkm", Abar, C))
            y = y + jnp.einsum("hkln,bhn->blhk", CA, x0)
            x_last = x_last + jnp.einsum("hnm,bhm->bhn", jnp.linalg.matrix_power(Abar, time), x0)
        return y, x_last
