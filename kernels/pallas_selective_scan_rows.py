"""The selective-scan kernels' shared pieces: the packed problem (:class:`Problem`) and the
per-row math of the forward and the adjoint recurrence that the GPU kernels (Mosaic and
its interpret-mode emulation, :mod:`mnemax.kernels.pallas_selective_scan` and
``pallas_selective_scan_wg``) run over each chunk of rows. The formulas are in
:mod:`mnemax.kernels.pallas_selective_scan`'s docstring."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

LANES = 128
LOG2E = math.log2(math.e)
RESET_OFFSET = -1e30  # added to a reset step's decay exponent: exp2 of it is 0


def _pad_to(x, axis: int, multiple: int, value=0):
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


class Problem:
    """The kernels' view of one call: padded, packed inputs and the static sizes."""

    def __init__(self, x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk, softplus, state_multiple=1, bc_multiple=8,
                 unroll=True, bwd_unroll=None, red_rows=0, red_multiple=64, sum_parts=1):
        batch, time, chans = x.shape
        self.n_real = A.shape[1]
        n = self.n_real + (-self.n_real) % state_multiple
        if n != self.n_real:  # zero-padded states: B = C = 0, h0 = 0, so they stay 0 and add nothing
            A = _pad_to(A, 1, state_multiple)
            B, C = _pad_to(B, 2, state_multiple), _pad_to(C, 2, state_multiple)
            h0 = None if h0 is None else _pad_to(h0, 2, state_multiple)
        self.batch, self.time, self.chans, self.n = batch, time, chans, n
        self.chunk, self.softplus, self.gated, self.unroll = chunk, softplus, z is not None, unroll
        self.has_resets = resets is not None
        self.bwd_unroll = unroll if bwd_unroll is None else bwd_unroll
        self.sum_parts = sum_parts
        if red_rows and chunk % red_rows:
            raise ValueError(f"red_rows: {red_rows} does not divide the chunk ({chunk}); expected a divisor of it")
        # the backward's batched lane sums: red_rows steps x (B, C) x state rows per flush, padded
        # to the row tiles of the register layout that reduces them
        self.red_rows = red_rows
        self.rows_pad = -(-red_rows * 2 * n // red_multiple) * red_multiple if red_rows else 0
        self.time_p = time + (-time) % chunk
        self.chans_p = chans + (-chans) % LANES
        self.n_chunks, self.n_blocks = self.time_p // chunk, self.chans_p // LANES
        self.bc_width = 2 * n + 3 + (-(2 * n + 3)) % bc_multiple
        f32 = jnp.float32

        def seq(v):  # (batch, time, chans) -> padded; padded steps have dt = 0 (no effect)
            return _pad_to(_pad_to(v, 1, chunk), 2, LANES)

        self.x, self.dt = seq(x), seq(dt)
        self.z = seq(z) if z is not None else None
        keep = jnp.ones((batch, time, 1), f32) if resets is None else 1.0 - resets.astype(f32)[..., None]
        valid = jnp.ones((batch, time, 1), f32)
        # the reset as an offset of the decay's exponent: exp2(delta a2 + off) is 0 where off =
        # RESET_OFFSET, so the forward drops the per-state (keep * h) multiply
        off = (1.0 - keep) * RESET_OFFSET
        bc = jnp.concatenate([B.astype(f32), C.astype(f32), keep, valid, off], axis=-1)
        # padded steps: B = C = 0, keep = 1, valid = 0, off = 0 (dt is zeroed there: the state passes unchanged)
        bc = _pad_to(_pad_to(bc, 2, bc_multiple), 1, chunk, value=0.0)
        self.bc = bc.at[:, time:, 2 * n].set(1.0) if self.time_p > time else bc
        # A^T (state, chans) in log2 units (exp(dt A) = exp2(dt A log2 e)); D and dt_bias rows.
        self.a2 = _pad_to(A.astype(f32).T * LOG2E, 1, LANES)
        d = jnp.zeros((chans,), f32) if D is None else D.astype(f32)
        bias = jnp.zeros((chans,), f32) if dt_bias is None else dt_bias.astype(f32)
        self.params = _pad_to(jnp.stack([d, bias]), 1, LANES)
        h0 = jnp.zeros((batch, chans, n), f32) if h0 is None else h0.astype(f32)
        self.h0 = _pad_to(jnp.swapaxes(h0, 1, 2), 2, LANES)  # (batch, state, chans)


# ----------------------------------------------------------------------------- per-step math


def _softplus(u):
    return jnp.where(u > 20.0, u, jnp.log(1.0 + jnp.exp(jnp.minimum(u, 20.0))))


def _sigmoid(v):
    return 1.0 / (1.0 + jnp.exp(-v))


def _sum_products(pairs, parts: int, init=None):
    """``init + sum(a * b for a, b in pairs)`` in ``parts`` interleaved partial sums, added
    pairwise at the end: dependency chains of len(pairs) / parts multiply-adds instead of one
    of len(pairs) (one warp per scheduler waits out each link's latency)."""
    acc = [None] * max(1, parts)
    if init is not None:
        acc[0] = init
    for j, (a, b) in enumerate(pairs):
        k = j % len(acc)
        acc[k] = a * b if acc[k] is None else acc[k] + a * b
    vals = [v for v in acc if v is not None]
    while len(vals) > 1:
        vals = [vals[i] + vals[i + 1] if i + 1 < len(vals) else vals[i] for i in range(0, len(vals), 2)]
    return vals[0]


def _fwd_rows(p: Problem, x_t, dt_t, z_t, bc_t, a2, dvec, bias, y_t, h, hbuf=None):
    """The forward recurrence over one chunk's rows. ``h``: tuple of ``state`` lane
    vectors. With ``hbuf`` (chunk, state, 128), stores every row's incoming state."""
    n = p.n

    def row(r, h):
        u = dt_t[r].astype(jnp.float32) + bias
        delta = (_softplus(u) if p.softplus else u) * bc_t[r, 2 * n + 1]
        xv = x_t[r].astype(jnp.float32)
        off = bc_t[r, 2 * n + 2]
        dbx = delta * xv
        new = []
        for i in range(n):
            if hbuf is not None:
                hbuf[r, i] = h[i]
            new.append(jnp.exp2(delta * a2[i] + off) * h[i] + dbx * bc_t[r, i])
        if y_t is None:  # the backward's recompute: only the states
            return tuple(new)
        y = _sum_products([(bc_t[r, n + i], new[i]) for i in range(n)], p.sum_parts, init=dvec * xv)
        if z_t is not None:
            zv = z_t[r].astype(jnp.float32)
            y = y * zv * _sigmoid(zv)
        y_t[r] = y.astype(y_t.dtype)
        return tuple(new)

    return lax.fori_loop(0, p.chunk, row, h, unroll=p.unroll)


def _bwd_rows(p: Problem, x_t, dt_t, z_t, bc_t, gy_t, a2, dvec, bias, hbuf, dx_t, ddt_t, dz_t, dbc_t, carry,
              pbuf=None, lane_sums=None):
    """Adjoint over one chunk's rows (last to first). carry = (g_h tuple, dA tuple, dD, dbias).

    dB and dC are sums over the block's 128 lanes. Without ``pbuf`` each is reduced on its
    own (``dbc_t``: (chunk, bc_width)). With ``pbuf`` ((rows_pad, 128) scratch) the lane
    products of ``p.red_rows`` steps are written to it, one row per (step, state, B or C),
    and ``lane_sums(pbuf)`` reduces them all at once into ``dbc_t``: (chunk // red_rows,
    rows_pad), row ``q`` holding steps ``q * red_rows + s`` at ``s * 2 state + [0, 2 state)``
    (dB first, then dC)."""
    n = p.n
    ln2 = 1.0 / LOG2E

    def row(r, slot, carry):
        gh, dA, dD, dbias = carry
        u = dt_t[r].astype(jnp.float32) + bias
        valid = bc_t[r, 2 * n + 1]
        delta = (_softplus(u) if p.softplus else u) * valid
        xv = x_t[r].astype(jnp.float32)
        off = bc_t[r, 2 * n + 2]  # the reset as an exponent offset: decay is 0 on a reset step
        gy = gy_t[r].astype(jnp.float32)
        dxv = delta * xv
        # recompute this row's decays and states from the incoming states in hbuf
        hprev = [hbuf[r, k] for k in range(n)]
        decay = [jnp.exp2(delta * a2[k] + off) for k in range(n)]
        hk = [decay[k] * hprev[k] + dxv * bc_t[r, k] for k in range(n)]
        if z_t is not None:
            zv = z_t[r].astype(jnp.float32)
            sg = _sigmoid(zv)
            ypre = _sum_products([(bc_t[r, n + k], hk[k]) for k in range(n)], p.sum_parts, init=dvec * xv)
            dz_t[r] = (gy * ypre * sg * (1.0 + zv * (1.0 - sg))).astype(dz_t.dtype)
            gy = gy * zv * sg
        dD = dD + gy * xv
        # g_k = dL/dh_k at this row. Sums shared by dx and ddelta: S = sum_k g_k B_k
        # (dx = gy D + delta S; the input term of ddelta = x S); dd = sum_k g_k decay_k
        # h_{k,prev} a2_k (the decay term of ddelta, times ln 2 once after the loop).
        gb, dda = [], []
        new_gh, new_dA = [], []
        for k in range(n):
            g = gh[k] + bc_t[r, n + k] * gy
            if pbuf is None:
                dbc_t[r, n + k] = jnp.sum(hk[k] * gy)
                dbc_t[r, k] = jnp.sum(g * dxv)
            else:
                pbuf[slot * 2 * n + n + k] = hk[k] * gy
                pbuf[slot * 2 * n + k] = g * dxv
            gb.append((g, bc_t[r, k]))
            carried = g * decay[k]  # dL/dh_prev through this row (0 across a reset)
            dh = carried * hprev[k]  # d/d(delta a2) of the decay term, over ln 2
            dda.append((dh, a2[k]))
            new_dA.append(dA[k] + dh * delta)
            new_gh.append(carried)
        s_gb = _sum_products(gb, p.sum_parts)
        ddelta = _sum_products(dda, p.sum_parts) * ln2 + s_gb * xv
        du = (ddelta * _sigmoid(u) if p.softplus else ddelta) * valid
        dx_t[r] = (gy * dvec + s_gb * delta).astype(dx_t.dtype)
        ddt_t[r] = du.astype(ddt_t.dtype)
        return tuple(new_gh), tuple(new_dA), dD, dbias + du

    if pbuf is None:
        return lax.fori_loop(0, p.chunk, lambda i, c: row(p.chunk - 1 - i, None, c), carry, unroll=p.bwd_unroll)
    f, groups = p.red_rows, p.chunk // p.red_rows

    def group(gi, carry):
        q = groups - 1 - gi

        def step(j, carry):
            slot = f - 1 - j
            return row(q * f + slot, slot, carry)

        carry = lax.fori_loop(0, f, step, carry, unroll=min(p.bwd_unroll, f))
        dbc_t[q] = lane_sums(pbuf)
        return carry

    return lax.fori_loop(0, groups, group, carry)
