"""What the matrix-state ops (``gated_linear_attention`` and ``delta_rule``) share: the
decay of a state by one step, the repeat of grouped q/k heads over the value heads, and the
chunk bookkeeping of their chunkwise forms (padding time to whole chunks, the segments
resets cut each chunk into, and decay-weighted score matrices computed stably in log space).

Within a chunk of ``L`` steps, ``G_t`` is the cumulative log decay since the chunk's
start (inclusive of step ``t``; ``G_t <= 0`` because every ``g <= 0``). The decay from
step ``s`` to step ``t >= s`` is ``exp(G_t - G_s)``: a scalar per head, or one factor
per key channel. Resets split a chunk into segments: ``seg_t`` counts the resets at
steps ``<= t`` of the chunk, and two steps interact only within one segment.

Scores with a per-channel decay, ``A_ts = sum_d x_td y_sd exp(G_td - G_sd)``, are not a
plain matmul. Factoring ``exp(G_t - G_s) = exp(G_t - G_0) exp(G_0 - G_s)`` around the
chunk's start overflows for strong decays, so the chunk is cut into sub-chunks of ``c``
steps (the secondary chunking of Yang et al., 2023, "Gated Linear Attention Transformers
with Hardware-Efficient Training", Section 4.3): for ``s`` in an earlier sub-chunk than
``t``, factor around ``r``, the last step before ``t``'s sub-chunk, where both factors
``exp(G_t - G_r)`` and ``exp(G_r - G_s)`` are at most 1 (their product underflows only
where the true decay does); inside a diagonal sub-chunk the ``(c, c, d)`` products are
formed directly. Where every chunk's decay spans at most :data:`SPAN_LIMIT` nats per
channel (ordinary gates), factoring around the middle of each channel's range keeps both
factors within ``exp(+-30)`` and the scores are one matmul per chunk
(:func:`factored_scores`); the sub-chunks are for the calls whose gates are stronger.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
SUB_CHUNK = 16
SPAN_LIMIT = 60.0  # nats a chunk's per-channel decay may span for its scores to be one factored matmul


def decay_factor(g_t, like):
    """``exp(g_t)`` shaped to scale a (B, H, d_k, d_v) state ``like``: g_t is (B, H) (one
    log decay per head) or (B, H, d_k) (one per key channel)."""
    a = jnp.exp(g_t)
    return a[..., None, None] if a.ndim == like.ndim - 2 else a[..., None]


def einsum(spec: str, *operands):
    """``jnp.einsum`` at full float32 precision (accelerators default to TF32/bf16 passes)."""
    return jnp.einsum(spec, *operands, precision=HIGHEST)


def pad_time(x, length: int, axis: int = 2):
    """``x`` zero-padded along ``axis`` to ``length`` steps."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def to_chunks(x, n_chunks: int, length: int):
    """``(B, H, T, ...) -> (B, H, n_chunks, length, ...)`` (``T == n_chunks * length``)."""
    return x.reshape(x.shape[:2] + (n_chunks, length) + x.shape[3:])


class Segments(NamedTuple):
    """Where resets cut each chunk; shapes broadcast against ``(B, H, N, L[, L])``.

    same:    (B, 1, N, L, L) steps t and s lie in one segment of the chunk
    fresh:   (B, 1, N, L)    no reset in the chunk up to and including t: the incoming
                             state reaches step t
    tail:    (B, 1, N, L)    step s lies in the chunk's last segment: it reaches the
                             outgoing state
    carries: (B, 1, N)       no reset in the chunk: the incoming state reaches its end
    """

    same: jnp.ndarray
    fresh: jnp.ndarray
    tail: jnp.ndarray
    carries: jnp.ndarray


def segments(resets, batch: int, n_chunks: int, length: int) -> Segments:
    """The :class:`Segments` of ``resets`` ((B, T_padded) bool, or None: one segment)."""
    if resets is None:
        resets = jnp.zeros((batch, n_chunks * length), bool)
    seg = jnp.cumsum(resets.reshape(batch, 1, n_chunks, length).astype(jnp.int32), axis=-1)
    return Segments(
        same=seg[..., :, None] == seg[..., None, :],
        fresh=seg == 0,
        tail=seg == seg[..., -1:],
        carries=seg[..., -1] == 0,
    )


def causal(length: int, *, strict: bool):
    """The (L, L) mask ``s < t`` (``strict``) or ``s <= t``."""
    t = jnp.arange(length)
    return (t[None, :] < t[:, None]) if strict else (t[None, :] <= t[:, None])


def decayed_scores(x, y, G, mask):
    """``A_ts = sum_d x_td y_sd exp(G_t - G_s)`` where ``mask``, else 0.

    Per-channel decays take one of two exact forms for the whole call (a ``lax.cond``): where
    no chunk's decay spans more than :data:`SPAN_LIMIT` nats in any channel,
    :func:`factored_scores` (one matmul per chunk), else :func:`sub_chunked_scores` (every
    exponent <= 0, for decays of any strength).

    Args:
      x, y: (..., L, d).
      G: cumulative log decays, (..., L) (one per head) or (..., L, d) (per channel),
        non-increasing along L.
      mask: bool, broadcastable to (..., L, L); must exclude ``s > t``.

    Returns:
      (..., L, L) in ``x``'s dtype.
    """
    if G.ndim == x.ndim - 1:  # one decay per head: scores times the decay matrix
        diff = jnp.where(mask, G[..., :, None] - G[..., None, :], -jnp.inf)
        return einsum("...td,...sd->...ts", x, y) * jnp.exp(diff)
    return _channel_scores(x, y, G, jnp.broadcast_to(mask, x.shape[:-2] + (x.shape[-2],) * 2))


def decay_span(G):
    """The largest range of ``G`` (..., L, d) along its steps: how many nats a chunk's
    cumulative decay spans in its most decaying channel (a scalar; also inside the Pallas
    kernels, on one chunk's (L, d) block)."""
    return jnp.max(jnp.max(G, axis=-2, keepdims=True) - jnp.min(G, axis=-2, keepdims=True))


def mid_range(G):
    """(..., 1, d): the middle of each channel's range of ``G`` (..., L, d) along its steps,
    the factored scores' centre."""
    return 0.5 * (jnp.max(G, axis=-2, keepdims=True) + jnp.min(G, axis=-2, keepdims=True))


def factorable(G):
    """Whether no chunk of ``G`` (..., L, d) spans more than :data:`SPAN_LIMIT` in a channel."""
    return decay_span(G) <= SPAN_LIMIT


def _factors(G):
    """(exp(G - c), exp(c - G)), ``c`` the middle of each channel's range in the chunk."""
    centre = lax.stop_gradient(mid_range(G))
    return jnp.exp(G - centre), jnp.exp(centre - G)


def factored_scores(x, y, G, mask):
    """:func:`decayed_scores` for per-channel decays spanning at most :data:`SPAN_LIMIT`
    nats in a chunk: ``(x exp(G - c)) (y exp(c - G))^T``, ``c`` the middle of each channel's
    range in the chunk, so that every factor lies within ``exp(+-SPAN_LIMIT / 2)``. Each
    term is a product (nothing cancels): exact up to rounding, like the sub-chunked form."""
    F, E = _factors(G)
    return jnp.where(mask, einsum("...td,...sd->...ts", x * F, y * E), 0.0)


@jax.custom_vjp
def _channel_scores(x, y, G, mask):
    """Per-channel :func:`decayed_scores` (``mask`` full-shaped): the form chosen by
    :func:`factorable` for the whole call, with a VJP that differentiates only that form
    (JAX's own VJP of a ``lax.cond`` made the factored calls' backward 2x slower)."""
    return lax.cond(factorable(G), factored_scores, sub_chunked_scores, x, y, G, mask)


def _channel_scores_fwd(x, y, G, mask):
    return _channel_scores(x, y, G, mask), (x, y, G, mask)


def _channel_scores_bwd(res, dA):
    """``dx = (dA Y) (.) F``, ``dy = (dA^T X) (.) E``, ``dG = x (.) dx - y (.) dy`` (X = x F,
    Y = y E, dA masked) for the factored form; JAX's VJP of the sub-chunked one."""
    x, y, G, mask = res

    def factored(dA):
        F, E = _factors(G)
        dA = jnp.where(mask, dA, 0.0)
        dx = einsum("...ts,...sd->...td", dA, y * E) * F
        dy = einsum("...ts,...td->...sd", dA, x * F) * E
        return dx, dy, x * dx - y * dy

    def sub_chunked(dA):
        return jax.vjp(lambda a, b, c: sub_chunked_scores(a, b, c, mask), x, y, G)[1](dA)

    return lax.cond(factorable(G), factored, sub_chunked, dA) + (None,)


_channel_scores.defvjp(_channel_scores_fwd, _channel_scores_bwd)


def sub_chunked_scores(x, y, G, mask):
    """:func:`decayed_scores` for per-channel decays of any strength, in sub-chunks (the
    module docstring): every exponent <= 0."""
    length = x.shape[-2]
    c = SUB_CHUNK if length % SUB_CHUNK == 0 else length
    n_sub = length // c
    lead = x.shape[:-2]
    sub = lambda a: a.reshape(lead + (n_sub, c, a.shape[-1]))  # noqa: E731
    xs, ys, Gs = sub(x), sub(y), sub(G)
    # diagonal sub-chunks: the (c, c, d) decays formed directly
    mask = jnp.broadcast_to(mask, lead + (length, length))
    blocks = mask.reshape(lead + (n_sub, c, n_sub, c))
    mdiag = jnp.diagonal(blocks, axis1=-4, axis2=-2)  # (..., c, c, n_sub)
    mdiag = jnp.moveaxis(mdiag, -1, -3)  # (..., n_sub, c, c)
    diff = jnp.where(mdiag[..., None], Gs[..., :, None, :] - Gs[..., None, :, :], -jnp.inf)
    diag = jnp.sum(xs[..., :, None, :] * ys[..., None, :, :] * jnp.exp(diff), axis=-1)  # (..., n_sub, c, c)
    eye = jnp.eye(n_sub, dtype=diag.dtype)
    out = einsum("...its,ij->...itjs", diag, eye).reshape(lead + (length, length))
    if n_sub == 1:
        return out
    # earlier sub-chunks: factor around r_i, the last step before sub-chunk i (G_r = 0 for i = 0)
    G_ref = jnp.concatenate([jnp.zeros_like(Gs[..., :1, -1, :]), Gs[..., :-1, -1, :]], axis=-2)  # (..., n_sub, d)
    starts = jnp.arange(n_sub) * c
    earlier = jnp.arange(length)[None, :] < starts[:, None]  # (n_sub, L): s before sub-chunk i
    x_r = xs * jnp.exp(Gs - G_ref[..., None, :])  # exp(G_t - G_r) <= 1
    y_r = y[..., None, :, :] * jnp.exp(
        jnp.where(earlier[..., None], G_ref[..., :, None, :] - G[..., None, :, :], -jnp.inf))  # (..., n_sub, L, d)
    off = einsum("...itd,...isd->...its", x_r, y_r).reshape(lead + (length, length))
    before = (jnp.arange(length)[None, :] < (jnp.arange(length) // c * c)[:, None])  # s in an earlier sub-chunk
    return out + jnp.where(mask & before, off, 0.0)


class Chunks(NamedTuple):
    """A sequence cut into ``N`` chunks of ``L`` steps (see :func:`chunk`): q (already
    scaled), k, v and the extra per-step arrays as (B, H, N, L, ...), the cumulative log
    decays ``G`` (B, H, N, L[, d_k]) and the :class:`Segments` of the resets."""

    q: jnp.ndarray
    k: jnp.ndarray
    v: jnp.ndarray
    extra: tuple
    G: jnp.ndarray
    seg: Segments
    time: int


def chunk(q, k, v, g, resets, *extra, chunk_size: int, scale: float, dtype) -> Chunks:
    """The inputs of a chunkwise form in ``dtype``, zero-padded to whole chunks (padded steps
    have zero keys and values and ``g = 0``: they leave the state as it is); ``g`` None is
    no decay."""
    B, _, T, _ = q.shape
    L = chunk_size
    N = -(-T // L)
    cut = lambda a: to_chunks(pad_time(a.astype(dtype), N * L), N, L)  # noqa: E731
    G = jnp.cumsum(cut(jnp.zeros(q.shape[:3], dtype) if g is None else g), axis=3)
    seg = segments(None if resets is None else pad_time(resets, N * L, axis=1), B, N, L)
    return Chunks(cut(q) * scale, cut(k), cut(v), tuple(cut(a) for a in extra), G, seg, T)


def boundary_terms(c: Chunks, k):
    """What carries a chunk's state across its boundaries, for keys ``k`` (B, H, N, L, d_k):
    ``q_in`` = q exp(G_t) (where the incoming state reaches t), ``k_in`` = k exp(G_t)
    (likewise), ``k_out`` = k exp(G_L - G_s) (s in the last segment) and the state's decay
    over the chunk ``exp(G_L)`` (B, H, N, 1 | d_k; 0 after a reset). Every exponent <= 0."""
    G = c.G
    G_last = G[:, :, :, -1:]  # (B, H, N, 1[, d_k])
    if G.ndim == 4:  # one decay per head
        G, G_last = G[..., None], G_last[..., None]
    fresh = c.seg.fresh[..., None]
    into = jnp.exp(G) * fresh
    k_out = k * jnp.exp(jnp.where(c.seg.tail[..., None], G_last - G, -jnp.inf))
    decay = jnp.exp(G_last[:, :, :, 0]) * c.seg.carries[..., None]
    return c.q * into, c.k * into, k_out, decay


def unchunk(o, c: Chunks):
    """(B, H, N, L, d_v) -> (B, H, T, d_v) without the padding."""
    B, H, N, L = o.shape[:4]
    return o.reshape(B, H, N * L, -1)[:, :, : c.time]


def repeat_heads(x, heads: int):
    """Grouped q or k (batch, heads / rep, time, d_k) -> (batch, heads, time, d_k): head ``j``
    serves value heads ``j * rep ... (j + 1) * rep - 1``."""
    return x if x.shape[1] == heads else jnp.repeat(x, heads // x.shape[1], axis=1)
