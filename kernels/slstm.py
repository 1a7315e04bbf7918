"""``slstm``: the sLSTM recurrence of xLSTM (Beck et al., 2024, Section 2.2).

Per batch row, head and unit, with input pre-activations ``x = W x_t`` for the gates
``(i, f, z, o)`` and block-diagonal recurrent weights ``R`` (one ``head_dim x head_dim``
block per head and gate)::

    (i~, f~, z~, o~)_t = x_t + R h_{t-1} + b
    m_t  = max(log sigma(f~_t) + m_{t-1}, i~_t)     (m_t = i~_t when n_{t-1} = 0: a fresh state)
    i'_t = exp(i~_t - m_t),  f'_t = exp(log sigma(f~_t) + m_{t-1} - m_t)
    c_t  = f'_t c_{t-1} + i'_t tanh(z~_t)
    n_t  = f'_t n_{t-1} + i'_t
    h_t  = sigmoid(o~_t) c_t / n_t

``(h, c, n, m)`` is the state; the fresh state is all zeros, and ``n = 0`` marks it (after
the first step ``n >= 1``), which is how the official vanilla backend picks ``m_1 = i~_1``.
A reset before step ``t`` replaces the incoming state by the fresh one.

Backends: ``reference`` (a ``lax.scan`` written as the equations above, float32) and
``xla`` (one fused ``lax.scan`` over a packed ``(4, ...)`` carry with the input and bias
added before the loop and resets folded into a multiplicative mask), and ``pallas_tpu``
(Mosaic TPU: one fused kernel for the whole sequence with the recurrent matrices in VMEM,
:mod:`mnemax.kernels.pallas_slstm`; opt-in until run on a TPU) / ``pallas_gpu`` (Triton:
one launch for the whole sequence with each head's matrices split over several programs
that exchange the state every step, :mod:`mnemax.kernels.pallas_slstm_gpu`; 4.1x the
``xla`` backend's forward+backward speed on an H100 at d 1024; opt-in by name). Both
forward and backward; float64 takes the ``xla`` path.

Shapes::

    h, state = slstm(x, R, b, state=None, resets=None)
    x: (batch, time, 4, heads, head_dim)   input pre-activations of gates (i, f, z, o)
    R: (heads, head_dim, 4, head_dim)      R[h, d_in, gate, d_out]
    b: (4, heads, head_dim) or None
    resets: (batch, time) bool
    h: (batch, time, heads, head_dim) in x's dtype
    state: SLSTMState(h, c, n, m), each (batch, heads, head_dim), float32 (float64 for float64 x)
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import dispatch
from .checks import float_array
from .mlstm import checked_resets, state_shapes

OP = "slstm"
_JITTED: dict = {}


class SLSTMState(NamedTuple):
    h: jax.Array  # (batch, heads, head_dim) hidden state (feeds the recurrent weights)
    c: jax.Array  # (batch, heads, head_dim) stabilised cell state
    n: jax.Array  # (batch, heads, head_dim) stabilised normaliser
    m: jax.Array  # (batch, heads, head_dim) log-scale stabiliser


def initial_state(batch: int, heads: int, head_dim: int, dtype=jnp.float32) -> SLSTMState:
    """The fresh (all-zero) state."""
    return SLSTMState(*(jnp.zeros((batch, heads, head_dim), dtype) for _ in range(4)))


def slstm(x, R, b=None, *, state: SLSTMState | tuple | None = None, resets=None, backend: str | None = None,
          interpret: bool | None = None):
    """The sLSTM over a sequence; returns ``(h, SLSTMState)`` (see the module docstring).
    ``interpret`` runs a Pallas backend in interpret mode (CPU); None reads
    ``MNEMAX_PALLAS_INTERPRET``."""
    x, R = float_array("x", x), float_array("R", R)
    if x.ndim != 5 or x.shape[2] != 4 or x.shape[1] < 1:
        raise ValueError(f"x must have shape (batch, time, 4, heads, head_dim) with time >= 1, got shape {x.shape}")
    batch, time, _, heads, head_dim = x.shape
    if R.shape != (heads, head_dim, 4, head_dim):
        raise ValueError(f"R must have shape (heads, head_dim, 4, head_dim) = {(heads, head_dim, 4, head_dim)}, got shape {R.shape}")
    if b is not None:
        b = float_array("b", b)
        if b.shape != (4, heads, head_dim):
            raise ValueError(f"b must have shape (4, heads, head_dim) = {(4, heads, head_dim)}, got shape {b.shape}")
    want = (batch, heads, head_dim)
    if state is not None:
        got = state_shapes(state)
        if got != (want,) * 4:
            raise ValueError(f"state must be (h, c, n, m), each of shape {want}, got {got}")
    resets = checked_resets(resets, batch, time)
    cdt = jnp.promote_types(jnp.result_type(x, R), jnp.float32)
    state = initial_state(batch, heads, head_dim, cdt) if state is None else SLSTMState(*(jnp.asarray(s, cdt) for s in state))
    b = jnp.zeros((4, heads, head_dim), cdt) if b is None else b.astype(cdt)
    name, impl = dispatch.resolve(OP, backend)
    if impl not in _JITTED:  # one compiled unit when called eagerly; inlined under jit
        params = inspect.signature(impl).parameters
        static = tuple(k for k in ("interpret", "options") if k in params)
        _JITTED[impl] = jax.jit(impl, static_argnames=static)
    kw = {"interpret": dispatch.interpret_flag(interpret)} if name.startswith("pallas") else {}
    if name == "pallas_gpu":  # a jit cache key: the kernels read pallas_slstm_gpu.GPU_OPTIONS while tracing
        from . import pallas_slstm_gpu

        kw["options"] = tuple(sorted(pallas_slstm_gpu.GPU_OPTIONS.items()))
    h, new_state = _JITTED[impl](x.astype(cdt), R.astype(cdt), b, state, resets, **kw)
    return h.astype(x.dtype), new_state


def _recurrent(R, h):
    """R h per head and gate: (batch, heads, d_in) -> (batch, 4, heads, d_out)."""
    return jnp.einsum("bhd,hdgo->bgho", h, R)


# ----------------------------------------------------------------------------- reference


@dispatch.register(OP, "reference")
def _reference(x, R, b, state, resets):
    batch, time = x.shape[:2]
    cut = jnp.zeros((batch, time), bool) if resets is None else resets

    def step(st, inp):
        x_t, cut_t = inp
        st = SLSTMState(*(jnp.where(cut_t[:, None, None], 0.0, s) for s in st))
        h, c, n, m = st
        raw = x_t + _recurrent(R, h) + b
        i_pre, f_pre, z_pre, o_pre = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        log_f = jax.nn.log_sigmoid(f_pre)
        fresh = n == 0.0
        m_new = jnp.where(fresh, i_pre, jnp.maximum(log_f + m, i_pre))
        i_act = jnp.exp(i_pre - m_new)
        # On a fresh state f' multiplies zeros; keep its exponent finite for the gradient.
        f_act = jnp.where(fresh, 0.0, jnp.exp(jnp.where(fresh, 0.0, log_f + m - m_new)))
        c_new = f_act * c + i_act * jnp.tanh(z_pre)
        n_new = f_act * n + i_act
        h_new = jax.nn.sigmoid(o_pre) * c_new / n_new
        return SLSTMState(h_new, c_new, n_new, m_new), h_new

    final, hs = lax.scan(step, state, (jnp.moveaxis(x, 1, 0), jnp.moveaxis(cut, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), final


# ----------------------------------------------------------------------------- xla


@dispatch.register(OP, "xla")
def _fused(x, R, b, state, resets):
    """One lax.scan over a packed (4, batch, heads, head_dim) carry [h, c, n, m]."""
    batch, time = x.shape[:2]
    pre = jnp.moveaxis(x + b, 1, 0)  # (T, B, 4, H, D): input and bias added outside the loop
    keep = jnp.ones((time, batch), x.dtype) if resets is None else 1.0 - jnp.moveaxis(resets, 1, 0).astype(x.dtype)
    carry0 = jnp.stack(state)

    def step(carry, inp):
        pre_t, keep_t = inp
        carry = carry * keep_t[None, :, None, None]
        h, c, n, m = carry
        gates = pre_t + _recurrent(R, h)
        log_f = jax.nn.log_sigmoid(gates[:, 1])
        started = n > 0.0
        m_new = jnp.where(started, jnp.maximum(log_f + m, gates[:, 0]), gates[:, 0])
        f_act = jnp.exp(jnp.where(started, log_f + m - m_new, -jnp.inf))
        i_act = jnp.exp(gates[:, 0] - m_new)
        c_new = f_act * c + i_act * jnp.tanh(gates[:, 2])
        n_new = f_act * n + i_act
        h_new = jax.nn.sigmoid(gates[:, 3]) * (c_new / n_new)
        return jnp.stack([h_new, c_new, n_new, m_new]), h_new

    final, hs = lax.scan(step, carry0, (pre, keep))
    return jnp.moveaxis(hs, 0, 1), SLSTMState(*final)


# ----------------------------------------------------------------------------- pallas


def _forward(platform, x, R, b, state, keep, save, interpret):
    if platform == "gpu":
        from . import pallas_slstm_gpu as pg

        return pg.forward(x, R, b, state, keep, save=save, interpret=interpret)
    from . import pallas_slstm as ps

    return ps.forward(x, R, b, state, keep, save=save, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _pallas_slstm(x, R, b, state, keep, platform, interpret):
    h, final, _ = _forward(platform, x, R, b, state, keep, False, interpret)
    return h, SLSTMState(*final)


def _pallas_fwd(x, R, b, state, keep, platform, interpret):
    h, final, saved = _forward(platform, x, R, b, state, keep, True, interpret)
    return (h, SLSTMState(*final)), (saved, keep)


def _pallas_bwd(platform, interpret, res, cts):
    saved, keep = res
    dh, dfinal = cts
    B, T, H, D = dh.shape
    if platform == "gpu":
        from . import pallas_slstm_gpu as pg

        dx, dR, db, d0 = pg.backward((B, T, 4, H, D), saved, dh, tuple(dfinal), interpret=interpret)
    else:
        from . import pallas_slstm as ps

        dx, dR, db, d0 = ps.backward((B, T, 4, H, D), saved, dh, tuple(dfinal), interpret=interpret)
    xdt = dh.dtype  # the compute dtype (float32): x was cast to it before the kernel
    return (dx.astype(xdt), dR.astype(xdt), db.astype(xdt), SLSTMState(*(a.astype(xdt) for a in d0)),
            None if keep is None else jnp.zeros_like(keep))


_pallas_slstm.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas(platform, x, R, b, state, resets, interpret=False):
    if x.dtype == jnp.float64:  # the kernels compute in float32
        return _fused(x, R, b, state, resets)

    def run(x, R, b, state, resets):
        keep = None if resets is None else 1.0 - resets.astype(jnp.float32)
        return _pallas_slstm(x, R, b, SLSTMState(*state), keep, platform, bool(interpret))

    rows, cols = dispatch.mesh_split(x.shape[0], x.shape[3])
    if rows is None and cols is None:
        return run(x, R, b, state, resets)
    # per (batch, head) shard under a mesh context (see dispatch.mesh_split)
    P = jax.sharding.PartitionSpec
    st = SLSTMState(*(P(rows, cols),) * 4)
    specs = (P(rows, None, None, cols), P(cols), P(None, cols), st, None if resets is None else P(rows))
    return jax.shard_map(run, in_specs=specs, out_specs=(P(rows, None, cols), st), check_vma=False)(
        x, R, b, SLSTMState(*state), resets)


@dispatch.register(OP, "pallas_gpu", default=False)  # opt-in until checked on a GPU
def _pallas_gpu(x, R, b, state, resets, interpret=False, options=()):
    del options  # only a jit cache key
    return _pallas("gpu", x, R, b, state, resets, interpret)


@dispatch.register(OP, "pallas_tpu", default=False)  # opt-in until checked on a TPU
def _pallas_tpu(x, R, b, state, resets, interpret=False):
    return _pallas("tpu", x, R, b, state, resets, interpret)
