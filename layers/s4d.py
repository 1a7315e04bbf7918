"""A diagonal state-space layer (S4D), the practical fast member of the LSSL family.

Gu, Gupta, Goel & Ré, "On the Parameterization and Initialization of Diagonal State
Space Models" (NeurIPS 2022). Per feature h (H of them) and mode n, with a diagonal A::

    A_n = -exp(log_A_real_n) + i A_imag_n            (complex; real: A_n = -exp(log_A_real_n))
    Abar_n = exp(dt_h A_n),  Bbar_n = (exp(dt_h A_n) - 1) / A_n     zero-order hold, B = 1
    x_t[n] = Abar_n x_{t-1}[n] + Bbar_n u_t
    y_t = 2 Re(sum_n C_n x_t[n]) + D u_t               (real: y_t = sum_n C_n x_t[n] + D u_t)

(B is fixed to 1: a trained B is redundant with C for a diagonal system.) The modes
come in conjugate pairs, so a complex layer keeps N/2 complex modes for N real
numbers of state and the factor 2 Re(.) adds the conjugates. dt is learned per
feature (log-uniform init in [dt_min, dt_max]). Inits of A (``a_init``):

* ``"lin"``  (S4D-Lin):  A_n = -1/2 + i pi n
* ``"inv"``  (S4D-Inv):  A_n = -1/2 + i (P/pi) (P/(2n+1) - 1),  P = N/2 modes
* ``"real"`` (S4D-Real): A_n = -(n+1), real modes (N of them)

Two views, as in the LSSL: ``mode="conv"`` trains through a causal FFT convolution with
the kernel ``K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l)`` (a Vandermonde product, (H, time):
nothing of shape (batch, time, H, N) exists), the final state and an incoming state's
contribution by Vandermonde products too; ``mode="recurrent"`` runs the recurrence on
:func:`mnemax.kernels.linear_scan` (any backend); ``mode="auto"`` (default) is conv unless
``resets`` are given. Then an activation and a linear output mixing (H -> H)::

    y, state = DiagonalSSM(features=H, state_size=N)(u, state, resets)
    u, y: (batch, time, H);  state: DiagonalSSMState(x=(batch, H, N)) float32

For complex layers the state holds the real parts of the N/2 modes followed by their
imaginary parts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.kernels import linear_scan
from mnemax.kernels.linear_scan import LinearScanConfig
from mnemax.kernels.sharding import KernelSharding

from .base import Dtype, compute_dtype, partitioned, state_dtype
from .lssl import ACTIVATIONS, MODES, causal_fft_conv, check_call, log_uniform_dt

INITS = ("lin", "inv", "real")


class DiagonalSSMState(NamedTuple):
    x: jax.Array  # (batch, H, N): real parts then imaginary parts (complex), or the N real modes


def s4d_init(a_init: str, N: int):
    """(log_A_real init, A_imag init or None) for the modes of one feature."""
    if a_init == "real":
        return (lambda k, s, d: jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=d)), s)), None
    P = N // 2
    n = jnp.arange(P)

    def imag(k, s, d):
        if a_init == "lin":
            return jnp.broadcast_to((math.pi * n).astype(d), s)
        return jnp.broadcast_to((P / math.pi * (P / (2 * n + 1) - 1)).astype(d), s)

    return (lambda k, s, d: jnp.full(s, math.log(0.5), d)), imag


class DiagonalSSM(nn.Module):
    """S4D layer (see module docstring).

    Attributes:
      features: H.
      state_size: N real numbers of state per feature (N/2 complex modes; even unless
        ``a_init="real"``).
      a_init: ``"lin"``, ``"inv"`` or ``"real"`` (the init of A).
      dt_min, dt_max: range of the log-uniform dt init.
      activation: ``"gelu"`` or ``"none"`` before the output mixing.
      mode: ``"auto"`` (conv unless ``resets`` are given), ``"conv"`` or ``"recurrent"``.
      backend: the ``linear_scan`` backend of the recurrent view (None: by platform).
      kernel_config, kernel_sharding: passed to ``linear_scan`` as ``config`` (its Pallas
        kernels' tuning) and ``sharding`` (the mesh axes splitting the batch and the
        features, for a Pallas backend under a mesh of several devices).
    """

    features: int
    state_size: int = 64
    a_init: str = "lin"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    activation: str = "gelu"
    mode: str = "auto"
    backend: str | None = None
    kernel_config: LinearScanConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def _complex(self) -> bool:
        return self.a_init != "real"

    def _check_config(self):
        if self.a_init not in INITS:
            raise ValueError(f"a_init must be one of {INITS}, got {self.a_init!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.state_size < 1 or (self._complex and self.state_size % 2):
            raise ValueError(f"state_size must be a positive even number for complex inits, got {self.state_size}")

    def initial_state(self, batch_size: int) -> DiagonalSSMState:
        self._check_config()
        return DiagonalSSMState(jnp.zeros((batch_size, self.features, self.state_size), state_dtype(self.dtype)))

    @nn.compact
    def __call__(self, u, state: DiagonalSSMState | None = None, resets=None):
        resets = check_call(self, u, state, resets)
        H = u.shape[-1]
        cdt = compute_dtype(self.dtype, u)
        sdt = state_dtype(self.dtype)
        rdt = jnp.promote_types(cdt, jnp.float32)  # the SSM itself runs in float32 (float64)
        modes = self.state_size // 2 if self._complex else self.state_size
        real_init, imag_init = s4d_init(self.a_init, self.state_size)
        names = ("embed", "state")
        log_dt = self.param("log_dt", partitioned(log_uniform_dt(self.dt_min, self.dt_max), ("embed",)), (H,), self.param_dtype)
        log_A_real = self.param("log_A_real", partitioned(real_init, names), (H, modes), self.param_dtype)
        A = -jnp.exp(log_A_real.astype(rdt))
        if self._complex:
            A_imag = self.param("A_imag", partitioned(imag_init, names), (H, modes), self.param_dtype)
            # C ~ complex normal with E|C|^2 = 1: real and imaginary parts with variance 1/2
            C = self.param("C", partitioned(nn.initializers.normal(math.sqrt(0.5)), names + (None,)), (H, modes, 2), self.param_dtype)
            A = A + 1j * A_imag.astype(rdt)
            C = C[..., 0].astype(rdt) + 1j * C[..., 1].astype(rdt)
        else:
            C = self.param("C", partitioned(nn.initializers.normal(1.0), names), (H, modes), self.param_dtype).astype(rdt)
        D = self.param("D", partitioned(nn.initializers.normal(1.0), ("embed",)), (H,), self.param_dtype)

        dtA = jnp.exp(log_dt.astype(rdt))[:, None] * A  # (H, modes)
        Abar = jnp.exp(dtA)
        Bbar = (Abar - 1.0) / A
        u = u.astype(rdt)
        h0 = None
        if state is not None:
            h0 = state.x.astype(rdt)
            if self._complex:
                h0 = h0[..., :modes] + 1j * h0[..., modes:]
        if self.mode == "recurrent" or resets is not None:
            xs = linear_scan(Abar[None, None], Bbar * u[..., None], h0=h0, resets=resets, backend=self.backend,
                             config=self.kernel_config, sharding=self.kernel_sharding)
            y = jnp.einsum("bthn,hn->bth", xs, C)
            last = xs[:, -1]
        else:
            y, last = self._convolutional(u, h0, dtA, Bbar, C)
        y = 2.0 * y.real if self._complex else y
        y = y + u * D.astype(rdt)
        if self.activation == "gelu":
            y = jax.nn.gelu(y, approximate=False)
        y = nn.Dense(
            H, dtype=cdt, param_dtype=self.param_dtype,
            kernel_init=partitioned(nn.initializers.lecun_normal(), (None, "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="output_linear",
        )(y.astype(cdt))
        if self._complex:
            last = jnp.concatenate([last.real, last.imag], axis=-1)
        return y, DiagonalSSMState(last.astype(sdt))

    @staticmethod
    def _convolutional(u, h0, dtA, Bbar, C):
        """The conv view: (Re of y before 2 Re / D (batch, time, H), final state (batch, H, modes)).
        ``V[h, n, l] = Abar_n^l = exp(l dt A_n)``, so ``K = sum_n C_n Bbar_n V[., n, l]``,
        ``x_{T-1} = sum_s Abar^(T-1-s) Bbar u_s (+ Abar^T h0)`` and an incoming state adds
        ``sum_n C_n Abar_n^(t+1) h0_n`` to step t."""
        time = u.shape[1]
        V = jnp.exp(dtA[..., None] * jnp.arange(time, dtype=u.dtype))  # (H, modes, time)
        K = jnp.einsum("hn,hnl->hl", C * Bbar, V)
        # u is real, so Re(K * u) = Re(K) * u: only the real part reaches the output (2 Re(.))
        y = causal_fft_conv(u, K.real[:, None])[..., 0]
        last = jnp.einsum("hnl,blh->bhn", V[..., ::-1] * Bbar[..., None], u.astype(V.dtype))
        if h0 is not None:
            AV = V * jnp.exp(dtA)[..., None]  # Abar^(t+1)
            y = y + jnp.einsum("hnl,bhn->blh", C[..., None] * AV, h0).real
            last = last + AV[..., -1] * h0
        return y, last
