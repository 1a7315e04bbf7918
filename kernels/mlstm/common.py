"""What every ``mlstm`` variant shares: the state, the input checks, the GPU kernels'
configuration, and the chunk math of the Pallas kernels (TPU and GPU bodies).

The recurrence (Beck et al., 2024, "xLSTM", Section 2.3), per batch row and head::

    m_t = max(log sigma(f~_t) + m_{t-1}, i~_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T,   n_t = f'_t n_{t-1} + i'_t k_t
    h_t = (s q_t)^T C_t / (max(|(s q_t)^T n_t|, exp(-m_t)) + eps)

(see :mod:`mnemax.kernels.mlstm` for the whole statement and the shapes).

Chunk math of the Pallas kernels. The intra-chunk work is matmuls (``Q K^T`` masked by the
decay matrix, times ``V``) and the stabilised state ``(C, n, m)`` is carried across chunks.
Per chunk of ``L`` steps, with ``b`` the log-forget sum inside the chunk, ``r`` the number
of resets so far inside the chunk and ``g`` the stabiliser candidate of a key (``i~``, or
``max(i~, log sigma(f~))`` at a reset)::

    mask_ts = s <= t,  r_s == r_t,  s a real (not padding) step
    m_t     = max(b_t + m_in  [r_t == 0],  max_s (b_t - b_s + g_s) [mask])
    D_ts    = exp(b_t - b_s + i~_s - m_t) [mask],   w_t = exp(b_t + m_in - m_t) [r_t == 0]
    S       = (s Q K^T) * D
    h_t     = (S V + w Q C_in)_t / (max(|S 1 + w Q n_in|_t, exp(-m_t)) + eps)

and the state at the chunk's end is row ``L - 1`` of the same weights applied to the
keys. The forward saves each chunk's incoming state; the backward recomputes each chunk
from its incoming state and runs the adjoint of the above (:func:`bwd_chunk`), with the
state gradients carried from the last chunk to the first. Gradients are taken in the
parametrisation (unstabilised memory ``exp(m) C``, stabiliser ``m``): the stabiliser
changes the outputs only through ``eps`` and the returned state, so its gradient
``gm_t = -eps (dh_t . h_t) / denom_t`` (plus the final state's) is routed along the
arg-max path of each ``m_t`` (a key's ``i~``, a reset's ``log sigma(f~)``, or the carried
``m_in``), and the carried state's gradient ``dC = exp(m) dL/d(exp(m) C)`` stays bounded
like the state itself.

Gate arrays are packed per chunk in both orientations (``(L, 8)`` columns and ``(8, L)``
rows: ``i~, b, r, valid, g, reset-candidate flag``, :func:`make_problem`), so no
transposes are needed in the kernels. Padded steps (time rounded up to a chunk multiple)
are masked out as keys and have log-forget 0, so they leave the state untouched.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ..checks import bool_resets, float_array, state_shapes
from ..chunked_pallas import col_to_row, row_to_col

OP = "mlstm"
NEG_INF = -jnp.inf
F32 = jnp.float32
GATE_ROWS = 8  # i~, b, r, valid, g, flag, 0, 0


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


# ----------------------------------------------------------------------------- configuration


def _power_of_two(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and not x & (x - 1)


def _check(cls: str, name: str, value, ok: bool, allowed: str):
    if not ok:
        raise ValueError(f"{cls}.{name}: got {value!r}; expected {allowed}")


@dataclasses.dataclass(frozen=True)
class MLSTMConfig:
    """Tuning of the Pallas GPU mLSTM kernels: a frozen, hashable value passed to
    ``mlstm(..., config=)`` as a static argument (``None``: these defaults, the fastest
    measured on an H100 at d_qk 256 / d_v 512, benchmarks/RESULTS.md "xLSTM kernels").
    The TPU kernels and the other backends ignore it.

    Attributes:
      block_v: value columns per per-chunk program (None: the largest power of two <= d_v
        with d_qk * block_v <= 16384).
      block_k: key columns per program of the backward's dq/dk kernel (halved where two
        pipeline copies of its loads would not fit in shared memory).
      dv: where dv is computed: "loop" -- one program per (row, chunk) looping over the value
        blocks; "fused" -- inside the dq/dk program's value loop (needs one key block);
        "auto" -- "fused" where there is one key block, else "loop".
      num_warps, num_stages: warps and Triton pipeline stages of the per-chunk kernels not
        set below (the dv kernel; the state walks take num_stages).
      fwd_warps: the forward output kernel's warps (None: num_warps).
      dqk_warps, dqk_stages: the dq/dk kernel's (None: num_warps / num_stages).
      dv_warps: the dv kernel's warps (None: num_warps).
      state_block, state_warps: the state walk's (d_qk, d_v) tile and warps (None: 128 on 8
        warps when batch x heads x tiles fills every SM, else 64 on 4).
    """

    block_v: int | None = None
    block_k: int = 128
    dv: str = "auto"
    num_warps: int = 4
    num_stages: int = 2
    fwd_warps: int | None = 4
    dqk_warps: int | None = 8
    dqk_stages: int | None = 3
    dv_warps: int | None = None
    state_block: int | None = None
    state_warps: int | None = None

    def __post_init__(self):
        c = "MLSTMConfig"
        _check(c, "block_v", self.block_v, self.block_v is None or (_power_of_two(self.block_v) and self.block_v >= 16),
               "None or a power of two >= 16")
        _check(c, "block_k", self.block_k, _power_of_two(self.block_k) and self.block_k >= 8, "a power of two >= 8")
        _check(c, "dv", self.dv, self.dv in ("auto", "loop", "fused"), "'auto', 'loop' or 'fused'")
        for name in ("num_warps", "fwd_warps", "dqk_warps", "dv_warps", "state_warps"):
            value = getattr(self, name)
            _check(c, name, value, (value is None and name != "num_warps") or (_power_of_two(value) and value <= 32),
                   "a power of two from 1 to 32" + ("" if name == "num_warps" else " or None"))
        for name in ("num_stages", "dqk_stages"):
            value = getattr(self, name)
            ok = (value is None and name != "num_stages") or (isinstance(value, int) and not isinstance(value, bool)
                                                              and value >= 1)
            _check(c, name, value, ok, "a positive int" + ("" if name == "num_stages" else " or None"))
        _check(c, "state_block", self.state_block,
               self.state_block is None or (_power_of_two(self.state_block) and self.state_block >= 16),
               "None or a power of two >= 16")


# ----------------------------------------------------------------------------- checks


def validate(q, k, v, i, f, state, resets, chunk_size):
    """The inputs as float arrays and resets as a bool array (or None); ValueError/TypeError
    naming the argument on a wrong shape or dtype."""
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
    return q, k, v, i, f, bool_resets(resets, batch, time)


def stabiliser_max(x, axis: int = -1):
    """``jnp.max(x, axis)`` with its gradient sent to one arg-max entry (a gather). ``jnp.max``'s
    gradient divides by the number of entries equal to the result; where XLA computes the
    operand again in another fusion, with another rounding, that count can be 0 and the
    gradient 0/0 = NaN: the xLSTM 7B layer's gate gradients were NaN so under jit on the CPU at
    LLVM -O0, and finite op by op. The stabiliser's value is the same (the arg-max entry)."""
    idx = jnp.argmax(x, axis=axis, keepdims=True)
    return jnp.squeeze(jnp.take_along_axis(x, idx, axis=axis), axis)


def normalise(num, den, m, eps):
    """h = num / (max(|den|, exp(-m)) + eps); num (..., d_v), den and m (...)."""
    return num / (jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps)[..., None]


# ----------------------------------------------------------------------------- Pallas chunk math


def matmul(a, b, dims, mm_dtype):
    """``dot_general`` contracting ``dims`` on operands rounded to ``mm_dtype``, float32
    accumulation (float32 operands at HIGHEST precision)."""
    prec = lax.Precision.HIGHEST if mm_dtype == F32 else None
    return lax.dot_general(a.astype(mm_dtype), b.astype(mm_dtype), (dims, ((), ())), precision=prec,
                           preferred_element_type=F32)


def dot(a, b, mm):  # a @ b
    return matmul(a, b, ((1,), (0,)), mm)


def dot_nt(a, b, mm):  # a @ b.T
    return matmul(a, b, ((1,), (1,)), mm)


def dot_tn(a, b, mm):  # a.T @ b
    return matmul(a, b, ((0,), (0,)), mm)


class Gates(NamedTuple):
    """Per-step gate quantities of one chunk, as columns (L, 1) or rows (1, L)."""

    i: jax.Array
    b: jax.Array
    r: jax.Array
    ok: jax.Array
    g: jax.Array
    fl: jax.Array


class Chunk(NamedTuple):
    """The recomputable per-chunk weights (see the module docstring)."""

    mask: jax.Array  # (L, L) bool
    log_g: jax.Array  # (L, L) stabiliser candidates
    intra: jax.Array  # (L, 1) max over keys
    log_a: jax.Array  # (L, 1) carried-state log weight (before m)
    m: jax.Array  # (L, 1)
    d: jax.Array  # (L, L)
    w: jax.Array  # (L, 1)
    c: jax.Array  # (L, 1) key weights into the chunk-end state
    w_a: jax.Array  # (1, 1) carried-state weight into the chunk-end state
    m_end: jax.Array  # (1, 1)


def chunk_weights(gc: Gates, gr: Gates, m_in, L: int) -> Chunk:
    """The chunk's weights from its gates as columns ``gc`` and rows ``gr`` and the
    incoming stabiliser ``m_in``."""
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    mask = (col <= row) & (gc.r == gr.r) & (gr.ok > 0)
    decay = gc.b - gr.b
    log_d = jnp.where(mask, decay + gr.i, NEG_INF)
    log_g = jnp.where(mask, decay + gr.g, NEG_INF)
    intra = jnp.max(log_g, axis=1, keepdims=True)
    log_a = jnp.where(gc.r == 0, gc.b + m_in, NEG_INF)
    m = jnp.maximum(log_a, intra)
    d = jnp.exp(log_d - m)
    w = jnp.exp(log_a - m)
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    b_end = jnp.sum(jnp.where(last, gc.b, 0.0), axis=0, keepdims=True)
    r_end = jnp.sum(jnp.where(last, gc.r, 0.0), axis=0, keepdims=True)
    m_loc = jnp.max(jnp.where(last, intra, NEG_INF), axis=0, keepdims=True)
    log_a_end = jnp.where(r_end == 0, b_end + m_in, NEG_INF)
    m_end = jnp.maximum(log_a_end, m_loc)
    c = jnp.exp(jnp.where((gc.r == r_end) & (gc.ok > 0), b_end - gc.b + gc.i, NEG_INF) - m_end)
    return Chunk(mask, log_g, intra, log_a, m, d, w, c, jnp.exp(log_a_end - m_end), m_end)


def scores(q, k, n, x: Chunk, *, scale, eps, mm):
    """Scaled queries, masked scores S, the normaliser sum ``den`` and ``denom``."""
    qs = q.astype(F32) * scale
    s = dot_nt(qs, k, mm) * x.d
    den = jnp.sum(s, axis=1, keepdims=True) + x.w * jnp.sum(qs * n, axis=1, keepdims=True)
    return qs, s, den, jnp.maximum(jnp.abs(den), jnp.exp(-x.m)) + eps


def _outputs(q, k, v, C, n, x: Chunk, *, scale, eps, mm):
    qs, s, den, denom = scores(q, k, n, x, scale=scale, eps=eps, mm=mm)
    num = dot(s, v, mm) + x.w * dot(qs, C, mm)
    return qs, s, den, denom, num / denom


def fwd_chunk(q, k, v, gc, gr, C, n, m_in, *, scale, eps, mm):
    """One chunk forward: returns h (L, d_v) and the chunk-end state (C, n, m)."""
    L = q.shape[0]
    x = chunk_weights(gc, gr, m_in, L)
    _, _, _, _, h = _outputs(q, k, v, C, n, x, scale=scale, eps=eps, mm=mm)
    kc = k.astype(F32) * x.c
    C_new = x.w_a * C + dot_tn(kc, v, mm)
    n_new = x.w_a * n + jnp.sum(kc, axis=0, keepdims=True)
    return h, C_new, n_new, x.m_end


def bwd_chunk(q, k, v, dh, gc, gr, C, n, m_in, dC, dn, gm, *, scale, eps, mm):
    """One chunk backward. ``(C, n, m_in)``: the chunk's incoming state; ``(dC, dn, gm)``:
    the gradient of the chunk-end state (see the module docstring). Returns dq, dk, dv,
    the gate gradients as rows (di (1, L), dlogf (1, L)) and the incoming state's
    gradient (dC, dn, gm)."""
    L = q.shape[0]
    x = chunk_weights(gc, gr, m_in, L)
    qs, s, den, denom, h = _outputs(q, k, v, C, n, x, scale=scale, eps=eps, mm=mm)
    dh = dh.astype(F32)
    dnum = dh / denom
    dhh = jnp.sum(dh * h, axis=1, keepdims=True)
    dden = jnp.where(jnp.abs(den) > jnp.exp(-x.m), -dhh / denom * jnp.sign(den), 0.0)
    last = lax.broadcasted_iota(jnp.int32, (L, 1), 0) == L - 1
    gm_row = -eps * dhh / denom + jnp.where(last, gm, 0.0)  # dL/dm_t at fixed exp(m) C

    G = dot_nt(dnum, v, mm) + dden  # dL/dS
    P = s * G  # dL/d(log weight) of each (t, s) term
    dG = x.d * G
    carry_q = x.w * (dot_nt(dnum, C, mm) + dden * n)  # (L, d_qk)
    dqs = dot(dG, k, mm) + carry_q
    R = jnp.sum(qs * carry_q, axis=1, keepdims=True)  # dL/d(log w_t)
    Y = dot_nt(v, dC, mm) + dn  # (L, d_qk)
    dk = dot_tn(dG, qs, mm) + x.c * Y
    dv = dot_tn(s, dnum, mm) + x.c * dot(k, dC, mm)
    E = x.c * jnp.sum(k.astype(F32) * Y, axis=1, keepdims=True)  # dL/d(log c_s)
    E_a = x.w_a * (jnp.sum(jnp.sum(C.astype(F32) * dC.astype(F32), axis=1, keepdims=True), axis=0, keepdims=True)
                   + jnp.sum(n * dn, axis=1, keepdims=True))

    # The stabiliser: m_t = b_t + (m_in or -b_a + g_a) along its arg-max.
    carry_wins = x.log_a >= x.intra
    onehot = x.mask & (x.log_g == x.intra) & jnp.logical_not(carry_wins)
    ties = jnp.maximum(jnp.sum(onehot.astype(F32), axis=1, keepdims=True), 1.0)
    Gm = jnp.where(onehot, gm_row / ties, 0.0)
    gm_in = jnp.sum(jnp.where(carry_wins, gm_row, 0.0), axis=0, keepdims=True)

    col_P = jnp.sum(P, axis=0, keepdims=True)
    col_Gm = jnp.sum(Gm, axis=0, keepdims=True)
    di = col_P + col_to_row(E, L) + col_Gm * (1.0 - gr.fl)
    db = (jnp.sum(P, axis=1, keepdims=True) + R + gm_row - row_to_col(col_P + col_Gm, L) - E
          + jnp.where(last, jnp.sum(E, axis=0, keepdims=True) + E_a, 0.0))
    row = lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = lax.broadcasted_iota(jnp.int32, (L, L), 1)
    dlogf = jnp.sum(jnp.where(row >= col, db, 0.0), axis=0, keepdims=True) + col_Gm * gr.fl
    qw = qs * x.w
    dC_in = x.w_a * dC + dot_tn(qw, dnum, mm)
    dn_in = x.w_a * dn + jnp.sum(qw * dden, axis=0, keepdims=True)
    return dqs * scale, dk, dv, di, dlogf, dC_in, dn_in, gm_in


# ----------------------------------------------------------------------------- the packed problem


def round_up(x, m):
    return x + (-x) % m


def pad_axis(x, axis, size, value=0.0):
    """``x`` zero-padded (or ``value``-padded) at the end of ``axis`` to ``size``."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


class Problem(NamedTuple):
    """Padded, packed inputs of one call. Sequences are (batch*heads, time_p, d)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    gcol: jax.Array  # (BH, NC, L, 8)
    grow: jax.Array  # (BH, NC, 8, L)
    L: int
    n_chunks: int
    d_qk: int  # padded sizes
    d_v: int


def chunk_length(platform: str, chunk_size: int, time: int) -> int:
    """The kernels' chunk: a multiple of 8 on TPU, a power of two >= 16 on GPU, never more
    than the padded length."""
    if platform == "tpu":
        return min(round_up(chunk_size, 8), round_up(time, 8))
    p2 = lambda x: 1 << max(4, (x - 1).bit_length())  # noqa: E731
    return min(p2(chunk_size), p2(time))


def feature_size(platform: str, d: int) -> int:
    """A feature dim as the kernels hold it: as is on TPU, a power of two >= 16 on GPU."""
    return d if platform == "tpu" else 1 << max(4, (d - 1).bit_length())


def make_problem(platform, q, k, v, i, f, keep, chunk_size) -> Problem:
    """q, k (B, H, T, d_qk); v (B, H, T, d_v); i, f (B, H, T) float32; keep (B, T) float
    (0 at a reset) or None."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    L = chunk_length(platform, chunk_size, T)
    NC = -(-T // L)
    Tp = NC * L
    dkp, dvp = feature_size(platform, dk), feature_size(platform, dv)

    def seq(x, d):
        return pad_axis(pad_axis(x.reshape(B * H, T, x.shape[-1]), 1, Tp), 2, d)

    logf = jax.nn.log_sigmoid(f).reshape(B * H, T)
    ig = i.reshape(B * H, T)
    reset = jnp.zeros((B * H, T), F32) if keep is None else jnp.repeat(1.0 - keep.astype(F32), H, axis=0)
    g = jnp.where(reset > 0, jnp.maximum(ig, logf), ig)
    flag = jnp.where((reset > 0) & (logf > ig), 1.0, 0.0)
    ok = jnp.ones((B * H, T), F32)
    rows = [pad_axis(a, 1, Tp).reshape(B * H, NC, L) for a in (ig, logf, reset, ok, g, flag)]
    ig, logf, reset, ok, g, flag = rows
    b = jnp.cumsum(logf, axis=-1)
    r = jnp.cumsum(reset, axis=-1)
    zero = jnp.zeros_like(b)
    grow = jnp.stack([ig, b, r, ok, g, flag, zero, zero], axis=2)  # (BH, NC, 8, L)
    return Problem(seq(q, dkp), seq(k, dkp), seq(v, dvp), jnp.swapaxes(grow, 2, 3), grow, L, NC, dkp, dvp)


def gates_from_tiles(gc, gr):
    """Gates from value tiles (L, 8) and (8, L)."""
    return (Gates(*(gc[:, j : j + 1] for j in range(6))), Gates(*(gr[j : j + 1, :] for j in range(6))))


def gates_from_refs(gc_r, gr_r):
    """Gates read from (L, 8) and (8, L) refs one column / row at a time (the Triton
    lowering has no ``slice`` of a loaded value, only of a ref)."""
    return (Gates(*(gc_r[:, j : j + 1] for j in range(6))), Gates(*(gr_r[j : j + 1, :] for j in range(6))))


def mm_dtype(dtype):
    """The matmul operand dtype: 16-bit inputs stay 16-bit, everything else float32."""
    return dtype if jnp.finfo(dtype).bits < 32 else F32


def state_in(p: Problem, state):
    """(C, n, m) of the op's layout -> the kernels' (BH, d_qk, d_v), (BH, 1, d_qk), (BH, 1, 1), padded, float32."""
    C, n, m = state
    BH = p.q.shape[0]
    C = pad_axis(pad_axis(C.astype(F32).reshape(BH, *C.shape[2:]), 1, p.d_qk), 2, p.d_v)
    n = pad_axis(n.astype(F32).reshape(BH, 1, n.shape[-1]), 2, p.d_qk)
    return C, n, m.astype(F32).reshape(BH, 1, 1)


def state_out(C, n, m, shape):
    """The kernels' state layout -> the op's (C, n, m) for ``shape`` = (B, H, d_qk, d_v)."""
    B, H, dk, dv = shape
    return C[:, :dk, :dv].reshape(B, H, dk, dv), n[:, 0, :dk].reshape(B, H, dk), m.reshape(B, H)
