"""The mLSTM's chunkwise form in plain XLA (``backend="xla"``): portable, and the
platform default where no Pallas kernel is.

The sequence is cut into chunks of ``chunk_size`` steps (padded internally; padded steps
have log-forget 0 and are masked out as keys, so they leave the state untouched). Within a
chunk, with ``b`` the log-forget sum since the chunk's start::

    D_ts = exp(b_t - b_s + i~_s - m_t)   (s <= t, no reset in between)
    h_t  = ((s Q K^T) * D) V + w_t (s q_t)^T C_in,  normalised as in the recurrence,

and each chunk's summary (decay ``G``, stabiliser ``m``, ``C``, ``n``) composes with the
next as a max-plus-stabilised linear map, run as an associative scan over chunks. Memory
is O(time * chunk_size) per head. Matmul operands stay in 16-bit inputs' dtype with
float32 accumulation (:func:`einsum_mm`); gates and the stabiliser are in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .common import NEG_INF, MLSTMState, normalise, stabiliser_max


def _chunk(x, n_chunks, length):
    """(B, H, T, ...) -> (B, H, NC, L, ...)."""
    return x.reshape(x.shape[:2] + (n_chunks, length) + x.shape[3:])


def _acc(mm):
    return jnp.promote_types(mm, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum_mm(spec, a, b, mm):
    """``einsum(spec, a, b)`` on operands rounded to ``mm``, accumulated in float32 (float64 for float64).

    The cotangents of ``a`` and ``b`` are computed the same way (``mm`` operands, float32
    accumulation) and returned in a's and b's own dtypes. (Autodiff through ``a.astype(mm)``
    would instead round each cotangent to ``mm`` before the cotangents of a value used
    several times are summed: with bf16 inputs that made the chunkwise form's gradients of
    q, k and the gates 7% off the float32 ones at d_qk 256 / d_v 512.) ``spec`` is "X,Y->Z"
    with every index of X in Y or Z and every index of Y in X or Z.
    """
    return jnp.einsum(spec, a.astype(mm), b.astype(mm), preferred_element_type=_acc(mm))


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


einsum_mm.defvjp(_einsum_mm_fwd, _einsum_mm_bwd)


def chunkwise(q, k, v, i, f, state, resets, *, chunk_size, eps, scale):
    """The chunkwise mLSTM (see the module docstring); i, f in the compute dtype."""
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
    # q, k, v in cdt: einsum_mm rounds them to mm per product and keeps their summed
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
        intra_max = stabiliser_max(jnp.where(mask, decay + gc[..., None, :], NEG_INF))  # (B, H, NC, L)
    else:
        intra_max = stabiliser_max(log_d)

    # Chunk summaries relative to the chunk's last step (padding leaves them unchanged).
    m_loc = intra_max[..., -1]  # (B, H, NC)
    w_loc = jnp.exp(log_d[..., -1, :] - m_loc[..., None])  # (B, H, NC, L)
    kw = w_loc[..., None] * kc
    kv_loc = einsum_mm("bhcsd,bhcsv->bhcdv", kw, vc, mm).astype(cdt)
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
    s = einsum_mm("bhctd,bhcsd->bhcts", qc, kc, mm).astype(cdt) * d
    num = einsum_mm("bhcts,bhcsv->bhctv", s, vc, mm).astype(cdt)
    num = num + w[..., None] * einsum_mm("bhctd,bhcdv->bhctv", qc, c_in, mm).astype(cdt)
    den = jnp.sum(s, axis=-1) + w * jnp.einsum("bhctd,bhcd->bhct", qc, n_in)
    h = normalise(num, den, m, eps).reshape(batch, heads, n_chunks * length, d_v)[:, :, :time]
    return h, final
