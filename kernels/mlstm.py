"""``mlstm``: the mLSTM memory of xLSTM (Beck et al., 2024, "xLSTM: Extended Long
Short-Term Memory", Section 2.3), in its recurrent, parallel and chunkwise forms.

Per batch row and head, with gate pre-activations ``i~_t``, ``f~_t`` (scalars),
key/query ``k_t, q_t`` (``d_qk``) and value ``v_t`` (``d_v``)::

    m_t = max(log sigma(f~_t) + m_{t-1}, i~_t)               stabiliser
    i'_t = exp(i~_t - m_t),  f'_t = exp(log sigma(f~_t) + m_{t-1} - m_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T                       (d_qk, d_v)
    n_t = f'_t n_{t-1} + i'_t k_t                             (d_qk)
    h_t = (s q_t)^T C_t / (max(|(s q_t)^T n_t|, exp(-m_t)) + eps),   s = qk_scale

``(C, n, m)`` is the stabilised state: the true memory is ``exp(m) C``. A fresh state
is all zeros (``m_0 = 0``, as in the official recurrent kernels), and ``h`` depends on
``m`` only through ``eps``. The scale ``s`` (default ``d_qk ** -0.5``) multiplies the
query, so ``C`` holds unscaled keys -- the convention of ``mlstm_kernels`` and xLSTM 7B
(the NeurIPS code scales the key instead, which changes the stored state by
``sqrt(d_qk)`` but not ``h``).

Resets: ``resets[:, t]`` True replaces the incoming state by a fresh one before step
``t``, so the state after a reset is exactly that of a sequence started there. In the
parallel and chunkwise forms this cuts the cumulative log-forget sum at the boundary;
the fresh state's ``m = 0`` enters the stabiliser as the candidate
``log sigma(f~_r) + sum of later log-forgets`` (the reset step's forget gate acting on
``m = 0``).

Forms (``backend=``):

* ``reference`` -- ``lax.scan`` over time, the equations above (float32): ground truth.
* ``parallel``  -- quadratic: ``D_ts = exp(F_t - F_s + i~_s - m_t)`` with ``F`` the
  cumulative log-forget sum, ``h = ((s Q K^T) * D) V / normaliser``; for short
  sequences and tests (not in the dispatch registry, never a default).
* ``xla``       -- chunkwise: the sequence is cut into chunks of ``chunk_size``
  (padded internally; padded steps leave the state untouched); an associative scan
  carries ``(C, n, m)`` across chunks and each chunk's outputs are intra-chunk matmuls plus
  the carried state's contribution. Memory is O(time * chunk_size) per head.

* ``pallas_tpu`` / ``pallas_gpu`` -- the chunkwise form as Pallas kernels (Mosaic TPU;
  Triton on GPU), forward and backward (:mod:`mnemax.kernels.pallas_mlstm`, GPU in
  :mod:`mnemax.kernels.pallas_mlstm_gpu`); float64
  inputs take the ``xla`` path. Opt-in (``backend=`` or ``MNEMAX_KERNEL_BACKEND``): not
  the platform default until they have been run on the hardware.

Shapes::

    h, state = mlstm(q, k, v, i, f, state=None, resets=None, chunk_size=64)
    q, k: (batch, heads, time, d_qk);  v: (batch, heads, time, d_v)
    i, f: (batch, heads, time) gate pre-activations;  resets: (batch, time) bool
    h: (batch, heads, time, d_v) in the dtype of q, k, v
    state: MLSTMState(C (batch, heads, d_qk, d_v), n (batch, heads, d_qk), m (batch, heads)),
           float32 (float64 for float64 inputs)
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import dispatch
from .checks import bool_resets, float_array

OP = "mlstm"
NEG_INF = -jnp.inf


class MLSTMState(NamedTuple):
    C: jax.Array  # (batch, heads, d_qk, d_v) stabilised matrix memory
    n: jax.Array  # (batch, heads, d_qk) stabilised normaliser
    m: jax.Array  # (batch, heads) log-scale stabiliser


def initial_state(batch: int, heads: int, d_qk: int, d_v: int, dtype=jnp.float32) -> MLSTMState:
    """The fresh (all-zero) state."""
    return MLSTMState(
        jnp.zeros((batch, heads, d_qk, d_v), dtype),
        jnp.zeros((batch, heads, d_qk), dtype),
        jnp.zeros((batch, heads), dtype),
    )


def checked_resets(resets, batch: int, time: int):
    """resets as a (batch, time) bool array, or None; ValueError on another shape, TypeError
    on another dtype."""
    return bool_resets(resets, batch, time)


def state_shapes(state):
    """The shapes of a state tuple's arrays (None if ``state`` is not iterable)."""
    try:
        return tuple(tuple(jnp.shape(s)) for s in state)
    except TypeError:
        return None


def _validate(q, k, v, i, f, state, resets, chunk_size):
    q, k, v, i, f = (float_array(n, a) for n, a in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)))
    if q.ndim != 4:
        raise ValueError(f"q must have shape (batch, heads, time, d_qk), got shape {q.shape}")
    batch, heads, time, d_qk = q.shape
    if time < 1:
        raise ValueError(f"q must have at least one time step, got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (batch, heads, time, d_qk) = {q.shape}, got shape {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (batch, heads, time, d_v) = {q.shape[:3] + ('d_v',)}, got shape {v.shape}")
    for name, g in (("i", i), ("f", f)):
        if g.shape != q.shape[:3]:
            raise ValueError(f"{name} must have shape (batch, heads, time) = {q.shape[:3]}, got shape {g.shape}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    d_v = v.shape[-1]
    want = ((batch, heads, d_qk, d_v), (batch, heads, d_qk), (batch, heads))
    if state is not None:
        got = state_shapes(state)
        if got != want:
            raise ValueError(f"state must be (C, n, m) with shapes {want}, got {got}")
    return q, k, v, i, f, checked_resets(resets, batch, time)


def mlstm(
    q,
    k,
    v,
    i,
    f,
    *,
    state: MLSTMState | tuple | None = None,
    resets=None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    qk_scale: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
):
    """The mLSTM over a sequence; returns ``(h, MLSTMState)`` (see the module docstring).

    Args:
      q, k: (batch, heads, time, d_qk); v: (batch, heads, time, d_v).
      i, f: input and forget gate pre-activations, (batch, heads, time).
      state: incoming ``(C, n, m)``; None is the fresh (zero) state.
      resets: (batch, time) bool; True replaces the state by a fresh one before step t.
      chunk_size: chunk length of the ``xla`` (chunkwise) form; other forms ignore it.
      eps: added to the normaliser.
      qk_scale: multiplies the query; default ``d_qk ** -0.5``.
      backend: ``"reference"``, ``"parallel"``, ``"xla"`` or a registered Pallas backend;
        None picks by platform (``MNEMAX_KERNEL_BACKEND`` overrides).
      interpret: run a Pallas backend in interpret mode (CPU); None reads
        ``MNEMAX_PALLAS_INTERPRET``.
    """
    q, k, v, i, f, resets = _validate(q, k, v, i, f, state, resets, chunk_size)
    out_dtype = jnp.result_type(q, k, v)
    cdt = jnp.promote_types(jnp.result_type(q, k, v, i, f), jnp.float32)
    batch, heads, _, d_qk = q.shape
    if state is None:
        state = initial_state(batch, heads, d_qk, v.shape[-1], cdt)
    else:
        state = MLSTMState(*(jnp.asarray(s, cdt) for s in state))
    scale = d_qk**-0.5 if qk_scale is None else float(qk_scale)
    if backend == "parallel":
        name, impl = backend, _parallel
    else:
        name, impl = dispatch.resolve(OP, backend)
    kw = {"interpret": dispatch.interpret_flag(interpret)} if name.startswith("pallas") else {}
    if name == "pallas_gpu":
        # the kernel options are read while tracing: make them part of the jit cache key, or a
        # changed option would reuse a trace made with the old ones
        from . import pallas_mlstm_gpu

        kw["options"] = tuple(sorted(pallas_mlstm_gpu.GPU_OPTIONS.items()))
    h, new_state = _jitted(impl)(
        q, k, v, i.astype(cdt), f.astype(cdt), state, resets, chunk_size=chunk_size, eps=eps, scale=scale, **kw
    )
    return h.astype(out_dtype), new_state


_JITTED: dict = {}


def _jitted(impl):
    """``impl`` under ``jax.jit`` (inlined inside an outer jit; one compiled unit eagerly)."""
    if impl not in _JITTED:
        params = inspect.signature(impl).parameters
        static = ("chunk_size", "eps", "scale") + tuple(a for a in ("interpret", "options") if a in params)
        _JITTED[impl] = jax.jit(impl, static_argnames=static)
    return _JITTED[impl]


def _normalise(num, den, m, eps):
    """h = num / (max(|den|, exp(-m)) + eps); num (..., d_v), den and m (...)."""
    return num / (jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps)[..., None]


# ----------------------------------------------------------------------------- reference


@dispatch.register(OP, "reference")
def _reference(q, k, v, i, f, state, resets, *, chunk_size, eps, scale):
    del chunk_size
    cdt = i.dtype
    batch, _, time, _ = q.shape
    cut = jnp.zeros((batch, time), bool) if resets is None else resets
    xs = (
        jnp.moveaxis(q.astype(cdt), 2, 0),
        jnp.moveaxis(k.astype(cdt), 2, 0),
        jnp.moveaxis(v.astype(cdt), 2, 0),
        jnp.moveaxis(i, 2, 0),
        jnp.moveaxis(jax.nn.log_sigmoid(f), 2, 0),
        jnp.moveaxis(cut, 1, 0),
    )

    def step(carry, x):
        C, n, m = carry
        q_t, k_t, v_t, i_t, logf_t, cut_t = x
        # A reset replaces the incoming state by the fresh (zero) one.
        C = jnp.where(cut_t[:, None, None, None], 0.0, C)
        n = jnp.where(cut_t[:, None, None], 0.0, n)
        m = jnp.where(cut_t[:, None], 0.0, m)
        m_new = jnp.maximum(logf_t + m, i_t)
        f_act = jnp.exp(logf_t + m - m_new)
        i_act = jnp.exp(i_t - m_new)
        C = f_act[..., None, None] * C + i_act[..., None, None] * (k_t[..., :, None] * v_t[..., None, :])
        n = f_act[..., None] * n + i_act[..., None] * k_t
        qs = q_t * scale
        num = jnp.einsum("bhd,bhdv->bhv", qs, C)
        den = jnp.einsum("bhd,bhd->bh", qs, n)
        return MLSTMState(C, n, m_new), _normalise(num, den, m_new, eps)

    final, hs = lax.scan(step, MLSTMState(*state), xs)
    return jnp.moveaxis(hs, 0, 2), final


# ----------------------------------------------------------------------------- parallel


def _parallel(q, k, v, i, f, state, resets, *, chunk_size, eps, scale):
    """The quadratic form over the whole sequence (one T x T decay matrix per head)."""
    del chunk_size
    cdt = i.dtype
    batch, _, time, _ = q.shape
    q, k, v = (a.astype(cdt) for a in (q, k, v))
    logf = jax.nn.log_sigmoid(f)
    F = jnp.cumsum(logf, axis=-1)  # (B, H, T)
    if resets is None:
        seg = jnp.zeros((batch, 1, time), jnp.int32)
        gate_for_m = i
    else:
        seg = jnp.cumsum(resets.astype(jnp.int32), axis=1)[:, None, :]
        # The fresh state at a reset contributes the candidate log sigma(f~_r) (+ later log-forgets).
        gate_for_m = jnp.where(resets[:, None, :], jnp.maximum(i, logf), i)
    t_idx = jnp.arange(time)
    mask = (t_idx[None, :] <= t_idx[:, None]) & (seg[..., :, None] == seg[..., None, :])  # (B, 1|H, T, T)
    decay = F[..., :, None] - F[..., None, :]
    log_d = jnp.where(mask, decay + i[..., None, :], NEG_INF)
    log_g = jnp.where(mask, decay + gate_for_m[..., None, :], NEG_INF)
    # The incoming state reaches step t unless a reset came in between.
    log_a = jnp.where(seg == 0, F + state.m[..., None], NEG_INF)  # (B, H, T)
    m = jnp.maximum(log_a, jnp.max(log_g, axis=-1))
    d = jnp.exp(log_d - m[..., None])
    w = jnp.exp(log_a - m)
    qs = q * scale
    s = jnp.einsum("bhtd,bhsd->bhts", qs, k) * d
    num = jnp.einsum("bhts,bhsv->bhtv", s, v) + w[..., None] * jnp.einsum("bhtd,bhdv->bhtv", qs, state.C)
    den = jnp.sum(s, axis=-1) + w * jnp.einsum("bhtd,bhd->bht", qs, state.n)
    # XLA:CPU (jax 0.11.2) miscompiles the division fused onto the einsums above for
    # several heads at T >= 1024 (outputs ~1e30, each head alone is right): keep num whole.
    num = lax.optimization_barrier(num)
    h = _normalise(num, den, m, eps)
    d_last, w_last = d[..., -1, :], w[..., -1]
    C = w_last[..., None, None] * state.C + jnp.einsum("bhs,bhsd,bhsv->bhdv", d_last, k, v)
    n = w_last[..., None] * state.n + jnp.einsum("bhs,bhsd->bhd", d_last, k)
    return h, MLSTMState(C, n, m[..., -1])


# ----------------------------------------------------------------------------- xla (chunkwise)


def _chunk(x, n_chunks, length):
    """(B, H, T, ...) -> (B, H, NC, L, ...)."""
    return x.reshape(x.shape[:2] + (n_chunks, length) + x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum_mm(spec, a, b, mm):
    """``einsum(spec, a, b)`` on operands rounded to ``mm``, accumulated in float32 (float64 for float64).

    The cotangents of ``a`` and ``b`` are computed the same way (``mm`` operands, float32
    accumulation) and returned in a's and b's own dtypes. (Autodiff through ``a.astype(mm)``
    would instead round each cotangent to ``mm`` before the cotangents of a value used
    several times are summed: with bf16 inputs that made the chunkwise form's gradients of
    q, k and the gates 7% off the float32 ones at d_qk 256 / d_v 512.) ``spec`` is "X,Y->Z"
    with every index of X in Y or Z and every index of Y in X or Z.
    """
    return jnp.einsum(spec, a.astype(mm), b.astype(mm), preferred_element_type=_acc(mm))


def _acc(mm):
    return jnp.promote_types(mm, jnp.float32)


def _einsum_mm_fwd(spec, a, b, mm):
    a_mm, b_mm = a.astype(mm), b.astype(mm)
    out = jnp.einsum(spec, a_mm, b_mm, preferred_element_type=_acc(mm))
    # zero-size arrays carry a's and b's dtypes to the backward
    return out, (a_mm, b_mm, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _einsum_mm_bwd(spec, mm, res, g):
    a_mm, b_mm, a_dt, b_dt = res
    ins, z = spec.split("->")
    x, y = ins.split(",")
    g = g.astype(mm)
    da = jnp.einsum(f"{z},{y}->{x}", g, b_mm, preferred_element_type=_acc(mm))
    db = jnp.einsum(f"{x},{z}->{y}", a_mm, g, preferred_element_type=_acc(mm))
    return da.astype(a_dt.dtype), db.astype(b_dt.dtype)


_einsum_mm.defvjp(_einsum_mm_fwd, _einsum_mm_bwd)


@dispatch.register(OP, "xla")
def _chunkwise(q, k, v, i, f, state, resets, *, chunk_size, eps, scale):
    cdt = i.dtype
    batch, heads, time, d_qk = q.shape
    d_v = v.shape[-1]
    length = min(chunk_size, time)
    n_chunks = -(-time // length)
    pad = n_chunks * length - time
    # Matmul operands stay in 16-bit inputs' dtype (float32 accumulation); all gate and
    # stabiliser arithmetic is in cdt.
    mm = q.dtype if jnp.finfo(q.dtype).bits < 32 else cdt
    logf = jax.nn.log_sigmoid(f)
    valid = jnp.arange(n_chunks * length) < time
    has_resets = resets is not None
    if resets is None:
        resets = jnp.zeros((batch, time), bool)
    if pad:
        # Padded steps: forget gate 1 (log 0), masked out as keys, never a reset.
        pad4 = ((0, 0), (0, 0), (0, pad), (0, 0))
        q, k, v = (jnp.pad(a, pad4) for a in (q, k, v))
        i, logf = (jnp.pad(a, pad4[:3]) for a in (i, logf))
        resets = jnp.pad(resets, ((0, 0), (0, pad)))
    # q, k, v in cdt: _einsum_mm rounds them to mm per product and keeps their summed
    # cotangents in cdt
    qc = _chunk(q.astype(cdt) * scale, n_chunks, length)
    kc = _chunk(k.astype(cdt), n_chunks, length)
    vc = _chunk(v.astype(cdt), n_chunks, length)
    ic, logfc = _chunk(i, n_chunks, length), _chunk(logf, n_chunks, length)

    seg = jnp.cumsum(resets.astype(jnp.int32), axis=1).reshape(batch, 1, n_chunks, length)
    seg_in = jnp.concatenate([jnp.zeros_like(seg[:, :, :1, -1]), seg[:, :, :-1, -1]], axis=2)  # (B, 1, NC)
    carried = seg == seg_in[..., None]  # step t still sees the chunk's incoming state
    b = jnp.cumsum(logfc, axis=-1)  # (B, H, NC, L) log-forget sum within the chunk
    tri = jnp.tril(jnp.ones((length, length), bool))
    key_ok = valid.reshape(n_chunks, length)[:, None, :]
    mask = tri & key_ok & (seg[..., :, None] == seg[..., None, :])  # (B, 1, NC, L, L)
    decay = b[..., :, None] - b[..., None, :]
    log_d = jnp.where(mask, decay + ic[..., None, :], NEG_INF)
    if has_resets:  # the fresh state at a reset adds the candidate log sigma(f~_r) to the max
        gc = _chunk(jnp.where(resets[:, None, :], jnp.maximum(i, logf), i), n_chunks, length)
        intra_max = jnp.max(jnp.where(mask, decay + gc[..., None, :], NEG_INF), axis=-1)  # (B, H, NC, L)
    else:
        intra_max = jnp.max(log_d, axis=-1)

    # Chunk summaries relative to the chunk's last step (padding leaves them unchanged).
    m_loc = intra_max[..., -1]  # (B, H, NC)
    w_loc = jnp.exp(log_d[..., -1, :] - m_loc[..., None])  # (B, H, NC, L)
    kw = w_loc[..., None] * kc
    kv_loc = _einsum_mm("bhcsd,bhcsv->bhcdv", kw, vc, mm).astype(cdt)
    k_loc = jnp.sum(kw, axis=-2)
    g_total = b[..., -1]  # (B, H, NC)
    carried_end = jnp.broadcast_to(carried[..., -1], g_total.shape)

    # The carry across chunks is a linear recurrence with a max-plus stabiliser, run as
    # an associative scan over chunk "maps" (log-decay G, stabiliser m, C, n): applying
    # map 1 then map 2 gives G = G1 + G2, m = max(m1 + G2, m2), C = e^(m1+G2-m) C1 +
    # e^(m2-m) C2. The incoming state is map 0 and a reset before a chunk's end sets
    # its G to -inf. No while loop: a lax.scan here kept every layer's recomputed
    # chunk states alive at once under jax.checkpoint (XLA hoists the loops), so remat
    # did not bound a deep stack's memory.
    g_map = jnp.where(carried_end, g_total, NEG_INF)
    elems = (
        jnp.concatenate([jnp.zeros_like(g_map[..., :1]), g_map], axis=2),
        jnp.concatenate([state.m[..., None].astype(cdt), m_loc], axis=2),
        jnp.concatenate([state.C[:, :, None].astype(cdt), kv_loc], axis=2),
        jnp.concatenate([state.n[:, :, None].astype(cdt), k_loc], axis=2),
    )

    def compose(e1, e2):
        g1, m1, c1, n1 = e1
        g2, m2, c2, n2 = e2
        a = m1 + g2
        m_new = jnp.maximum(a, m2)
        w1, w2 = jnp.exp(a - m_new), jnp.exp(m2 - m_new)
        return g1 + g2, m_new, w1[..., None, None] * c1 + w2[..., None, None] * c2, w1[..., None] * n1 + w2[..., None] * n2

    _, m_all, c_all, n_all = lax.associative_scan(compose, elems, axis=2)  # state after 0..NC chunks
    final = MLSTMState(c_all[:, :, -1], n_all[:, :, -1], m_all[:, :, -1])
    c_in, n_in, m_in = c_all[:, :, :-1], n_all[:, :, :-1], m_all[:, :, :-1]

    log_a = jnp.where(carried, b + m_in[..., None], NEG_INF)  # (B, H, NC, L)
    m = jnp.maximum(log_a, intra_max)
    d = jnp.exp(log_d - m[..., None])
    w = jnp.exp(log_a - m)
    s = _einsum_mm("bhctd,bhcsd->bhcts", qc, kc, mm).astype(cdt) * d
    num = _einsum_mm("bhcts,bhcsv->bhctv", s, vc, mm).astype(cdt)
    num = num + w[..., None] * _einsum_mm("bhctd,bhcdv->bhctv", qc, c_in, mm).astype(cdt)
    den = jnp.sum(s, axis=-1) + w * jnp.einsum("bhctd,bhcd->bhct", qc, n_in)
    h = _normalise(num, den, m, eps).reshape(batch, heads, n_chunks * length, d_v)[:, :, :time]
    return h, final


# ----------------------------------------------------------------------------- pallas


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12, 13))
def _pallas_mlstm(q, k, v, i, f, C0, n0, m0, keep, platform, chunk_size, eps, scale, interpret):
    from . import pallas_mlstm as pm

    h, final, _ = pm.forward(platform, q, k, v, i, f, (C0, n0, m0), keep, chunk_size=chunk_size, eps=eps, scale=scale,
                             save=False, interpret=interpret)
    return h, final


def _pallas_fwd(q, k, v, i, f, C0, n0, m0, keep, platform, chunk_size, eps, scale, interpret):
    from . import pallas_mlstm as pm

    h, final, bounds = pm.forward(platform, q, k, v, i, f, (C0, n0, m0), keep, chunk_size=chunk_size, eps=eps,
                                  scale=scale, save=True, interpret=interpret)
    return (h, final), (q, k, v, i, f, C0, n0, m0, keep, final, bounds)


def _pallas_bwd(platform, chunk_size, eps, scale, interpret, res, cts):
    from . import pallas_mlstm as pm

    q, k, v, i, f, C0, n0, m0, keep, final, bounds = res
    dh, dfinal = cts
    dq, dk, dv, di, df, (dC0, dn0, dm0) = pm.backward(
        platform, q, k, v, i, f, (C0, n0, m0), keep, final, bounds, dh, dfinal, chunk_size=chunk_size, eps=eps,
        scale=scale, interpret=interpret)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), di.astype(i.dtype), df.astype(f.dtype),
            dC0.astype(C0.dtype), dn0.astype(n0.dtype), dm0.astype(m0.dtype), None if keep is None else jnp.zeros_like(keep))


_pallas_mlstm.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas(platform, q, k, v, i, f, state, resets, *, chunk_size, eps, scale, interpret=False):
    if i.dtype == jnp.float64:  # the kernels compute in float32
        return _chunkwise(q, k, v, i, f, state, resets, chunk_size=chunk_size, eps=eps, scale=scale)

    def run(q, k, v, i, f, state, resets):
        keep = None if resets is None else 1.0 - resets.astype(jnp.float32)
        h, final = _pallas_mlstm(q, k, v, i, f, *state, keep, platform, chunk_size, eps, scale, bool(interpret))
        return h, MLSTMState(*final)

    rows, cols = dispatch.mesh_split(q.shape[0], q.shape[1])
    if rows is None and cols is None:
        return run(q, k, v, i, f, state, resets)
    # per (batch, head) shard under a mesh context (see dispatch.mesh_split)
    bh = jax.sharding.PartitionSpec(rows, cols)
    st = MLSTMState(bh, bh, bh)
    specs = (bh,) * 5 + (st, None if resets is None else jax.sharding.PartitionSpec(rows))
    return jax.shard_map(run, in_specs=specs, out_specs=(bh, st), check_vma=False)(q, k, v, i, f, MLSTMState(*state), resets)


# opt-in: checked on H100/H200 at heads up to d_qk 256 / d_v 512 (benchmarks/RESULTS.md), not yet at
# xlstm-1.3b's 1024-wide heads, which backend=None would send here on a GPU
@dispatch.register(OP, "pallas_gpu", default=False)
def _pallas_gpu(q, k, v, i, f, state, resets, *, chunk_size, eps, scale, interpret=False, options=()):
    del options  # only a jit cache key: the kernels read pallas_mlstm_gpu.GPU_OPTIONS
    return _pallas("gpu", q, k, v, i, f, state, resets, chunk_size=chunk_size, eps=eps, scale=scale, interpret=interpret)


@dispatch.register(OP, "pallas_tpu", default=False)  # opt-in until checked on a TPU
def _pallas_tpu(q, k, v, i, f, state, resets, *, chunk_size, eps, scale, interpret=False):
    return _pallas("tpu", q, k, v, i, f, state, resets, chunk_size=chunk_size, eps=eps, scale=scale, interpret=interpret)
