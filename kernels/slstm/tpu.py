"""Fused Pallas TPU (Mosaic) kernels for ``slstm``, forward and backward: one launch walks
the whole sequence, the head's recurrent matrices ``R_g`` (4 of ``head_dim x head_dim``)
stay in VMEM across time and the state ``(h, c, n, m)`` is carried in a VMEM scratch.

Each step, per head and batch block (the equations of :mod:`mnemax.kernels.slstm`)::

    (i~, f~, z~, o~) = x_t + h_{t-1} R_g + b_g       (4 matmuls (Bb, D) x (D, D))
    m_t = i~ on a fresh state (n_{t-1} = 0), else max(log sigma(f~) + m_{t-1}, i~)
    c_t = f' c_{t-1} + i' tanh(z~),  n_t = f' n_{t-1} + i',  h_t = sigma(o~) c_t / n_t

The forward saves the state after every step (``(T, 4, B, D)`` per head, the same
trade as the official CUDA kernels); the backward walks the steps last to first,
recomputes each step's gates from the saved incoming state and runs the step's
adjoint (:func:`~mnemax.kernels.slstm.common.adjoint`), accumulating ``dR`` and ``db`` on
chip (per batch block; XLA sums the blocks). Time is padded to whole chunks with steps
flagged invalid: the state passes through them unchanged.

Block sizes: grid (heads "parallel", batch blocks "parallel", time chunks
"arbitrary"); blocks (Lt, 4, Bb, D) of x, (4, D, D) of R, (4, Bb, D) state scratch;
``Bb`` = the batch rounded up to 8 (at most 128), ``Lt`` = 16 steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import F32, adjoint, pad, pointwise

TIME_BLOCK = 16


def _dot(a, b, dims=((1,), (0,))):
    return lax.dot_general(a, b, (dims, ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=F32)


def _gates(x4, R, b, h0):
    return [x4[g] + _dot(h0, R[g]) + b[g] for g in range(4)]


def _step(x4, R, b, st, keep):
    """The forward step's intermediates (a dict)."""
    h0, c0, n0, m0 = (s * keep for s in st)
    p = pointwise(_gates(x4, R, b, h0), c0, n0, m0)
    p["h0"] = h0
    return p


def step_fwd(x4, R, b, st, keep, valid):
    """One step. x4, R, b: per-gate lists ((Bb, D), (D, D), (1, D)); st: (h, c, n, m);
    keep (0 at a reset), valid (0 on padding): (Bb, 1). Returns the new state."""
    p = _step(x4, R, b, st, keep)
    return tuple(jnp.where(valid > 0, new, old) for new, old in zip((p["h1"], p["c1"], p["n1"], p["m1"]), st))


def step_bwd(x4, R, b, st, keep, valid, dh_out, g):
    """Adjoint of :func:`step_fwd`. g: gradient of the new state (h, c, n, m); dh_out:
    gradient of the step's output h. Returns (dx per gate, dR per gate, db per gate,
    gradient of the incoming state)."""
    p = _step(x4, R, b, st, keep)
    h0 = p["h0"]
    dh1 = g[0] + dh_out
    draw, (dc0, dn0, dm0) = adjoint(p, dh1, g[1], g[2], g[3])
    draw = [d * valid for d in draw]
    dh0 = sum(_dot(draw[k], R[k], ((1,), (1,))) for k in range(4))
    dR = [_dot(h0, draw[k], ((0,), (0,))) for k in range(4)]
    db = [jnp.sum(draw[k], axis=0, keepdims=True) for k in range(4)]
    d_in = (dh0, dc0, dn0, dm0)
    d_in = tuple(jnp.where(valid > 0, keep * dn, gn) for dn, gn in zip(d_in, (dh1, g[1], g[2], g[3])))
    return draw, dR, db, d_in


# ----------------------------------------------------------------------------- layout


def sizes(batch, time, head_dim):
    """(batch block, padded batch, time block, padded time, head_dim)."""
    bp = -(-batch // 8) * 8
    bb = bp if bp <= 128 else 128
    bp = -(-bp // bb) * bb
    lt = TIME_BLOCK
    return bb, bp, lt, -(-time // lt) * lt, head_dim


def pack(x, R, b, state, keep):
    """Kernel layouts: x (H, Tp, 4, Bp, D), R (H, 4, D, D), b (H, 4, 1, D),
    state (H, 4, Bp, D), kv (Tp, Bp, 2)."""
    B, T, _, H, D = x.shape
    bb, bp, lt, tp, dp = sizes(B, T, D)
    xs = pad(pad(pad(jnp.transpose(x, (3, 1, 2, 0, 4)), 1, tp), 3, bp), 4, dp)
    Rs = pad(pad(jnp.transpose(R, (0, 2, 1, 3)), 2, dp), 3, dp)
    bs = pad(jnp.transpose(b, (1, 0, 2))[:, :, None, :], 3, dp)
    st = pad(pad(jnp.transpose(jnp.stack(state), (2, 0, 1, 3)), 2, bp), 3, dp)
    keep = jnp.ones((B, T), F32) if keep is None else keep.astype(F32)
    kv = jnp.stack([keep.T, jnp.ones((T, B), F32)], axis=-1)
    kv = pad(pad(kv, 1, bp), 0, tp)
    kv = kv.at[T:, :, 0].set(1.0) if tp > T else kv
    return xs, Rs, bs, st, kv, (bb, lt)


# ----------------------------------------------------------------------------- kernels


def _fwd_steps(x_r, R, b, kv_r, st, n_steps, hs_r, states_r, t0=0):
    def body(t, st):
        x4 = [x_r[t, k] for k in range(4)]
        st = step_fwd(x4, R, b, st, kv_r[t, :, 0:1], kv_r[t, :, 1:2])
        hs_r[t0 + t] = st[0].astype(hs_r.dtype)
        if states_r is not None:
            for k in range(4):
                states_r[t0 + t, k] = st[k]
        return st

    return lax.fori_loop(0, n_steps, body, st)


def _bwd_steps(x_r, R, b, kv_r, prev_r, dh_r, dx_r, n_steps, carry):
    def body(j, carry):
        t = n_steps - 1 - j
        g, dR, db = carry
        x4 = [x_r[t, k] for k in range(4)]
        st = tuple(prev_r[t, k] for k in range(4))
        draw, dR_t, db_t, g = step_bwd(x4, R, b, st, kv_r[t, :, 0:1], kv_r[t, :, 1:2], dh_r[t].astype(F32), g)
        for k in range(4):
            dx_r[t, k] = draw[k].astype(dx_r.dtype)
        return g, tuple(a + c for a, c in zip(dR, dR_t)), tuple(a + c for a, c in zip(db, db_t))

    return lax.fori_loop(0, n_steps, body, carry)


def _tpu_fwd_kernel(x_r, R_r, b_r, s0_r, kv_r, hs_r, sT_r, *rest, lt, save):
    *states, s_s = rest

    @pl.when(pl.program_id(2) == 0)
    def _():
        s_s[...] = s0_r[...]

    R = [R_r[k] for k in range(4)]
    b = [b_r[k] for k in range(4)]
    st = _fwd_steps(x_r, R, b, kv_r, tuple(s_s[k] for k in range(4)), lt, hs_r, states[0] if save else None)
    for k in range(4):
        s_s[k] = st[k]
        sT_r[k] = st[k]


def _tpu_bwd_kernel(x_r, R_r, b_r, kv_r, prev_r, dh_r, gT_r, dx_r, dR_r, db_r, d0_r, g_s, dR_s, db_s, *, lt):
    @pl.when(pl.program_id(2) == 0)
    def _():
        g_s[...] = gT_r[...]
        dR_s[...] = jnp.zeros_like(dR_s)
        db_s[...] = jnp.zeros_like(db_s)

    R = [R_r[k] for k in range(4)]
    b = [b_r[k] for k in range(4)]
    carry = (tuple(g_s[k] for k in range(4)), tuple(dR_s[k] for k in range(4)), tuple(db_s[k] for k in range(4)))
    g, dR, db = _bwd_steps(x_r, R, b, kv_r, prev_r, dh_r, dx_r, lt, carry)
    for k in range(4):
        g_s[k], dR_s[k], db_s[k] = g[k], dR[k], db[k]
        d0_r[k], dR_r[k], db_r[k] = g[k], dR[k], db[k]


def _specs(H, nb, bb, lt, tp, D, reverse):
    """BlockSpecs over grid (head, batch block, time block)."""
    nt = tp // lt

    def tb(t):
        return nt - 1 - t if reverse else t

    return {
        "x": pl.BlockSpec((None, lt, 4, bb, D), lambda h, j, t: (h, tb(t), 0, j, 0)),
        "R": pl.BlockSpec((None, 4, D, D), lambda h, j, t: (h, 0, 0, 0)),
        "b": pl.BlockSpec((None, 4, 1, D), lambda h, j, t: (h, 0, 0, 0)),
        "s": pl.BlockSpec((None, 4, bb, D), lambda h, j, t: (h, 0, j, 0)),
        "kv": pl.BlockSpec((lt, bb, 2), lambda h, j, t: (tb(t), j, 0)),
        "hs": pl.BlockSpec((None, lt, bb, D), lambda h, j, t: (h, tb(t), j, 0)),
        "dR": pl.BlockSpec((None, None, 4, D, D), lambda h, j, t: (h, j, 0, 0, 0)),
        "db": pl.BlockSpec((None, None, 4, 1, D), lambda h, j, t: (h, j, 0, 0, 0)),
    }


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret):
    from jax.experimental.pallas import tpu as pltpu

    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        scratch_shapes=[pltpu.VMEM(s, F32) for s in scratch])


def forward(x, R, b, state, keep, *, save, interpret):
    """h (B, T, H, D), final state tuple and, with ``save``, (packed inputs, all states)."""
    B, T, _, H, D = x.shape
    xs, Rs, bs, s0, kv, (bb, lt) = pack(x, R, b, state, keep)
    tp, bp, dp = xs.shape[1], xs.shape[3], xs.shape[4]
    nb = bp // bb
    sp = _specs(H, nb, bb, lt, tp, dp, False)
    shapes = [jax.ShapeDtypeStruct((H, tp, bp, dp), x.dtype), jax.ShapeDtypeStruct((H, 4, bp, dp), F32)]
    out_specs = [sp["hs"], sp["s"]]
    if save:
        shapes.append(jax.ShapeDtypeStruct((H, tp, 4, bp, dp), F32))
        out_specs.append(sp["x"])
    grid, kernel = (H, nb, tp // lt), functools.partial(_tpu_fwd_kernel, lt=lt, save=save)
    outs = _call(kernel, grid, [sp["x"], sp["R"], sp["b"], sp["s"], sp["kv"]], out_specs, shapes,
                 [(4, bb, dp)], interpret)(xs.astype(F32), Rs.astype(F32), bs.astype(F32), s0, kv)
    h = jnp.transpose(outs[0][:, :T, :B, :D], (2, 1, 0, 3))
    final = tuple(jnp.transpose(outs[1][:, k, :B, :D], (1, 0, 2)) for k in range(4))
    return h, final, ((xs, Rs, bs, s0, kv), outs[2]) if save else None


def backward(shape, saved, dh, dfinal, *, interpret):
    """Gradients (dx, dR, db, dstate0) in the op's layouts."""
    B, T, _, H, D = shape
    (xs, Rs, bs, s0, kv), states = saved
    bb, _, lt, _, _ = sizes(B, T, D)
    tp, bp, dp = xs.shape[1], xs.shape[3], xs.shape[4]
    nb = bp // bb
    prev = jnp.concatenate([s0[:, None], states[:, :-1]], axis=1)  # the state entering each step
    dhs = pad(pad(pad(jnp.transpose(dh.astype(F32), (2, 1, 0, 3)), 1, tp), 2, bp), 3, dp)
    gT = pad(pad(jnp.transpose(jnp.stack([a.astype(F32) for a in dfinal]), (2, 0, 1, 3)), 2, bp), 3, dp)
    sp = _specs(H, nb, bb, lt, tp, dp, True)
    shapes = [jax.ShapeDtypeStruct(xs.shape, F32), jax.ShapeDtypeStruct((H, nb, 4, dp, dp), F32),
              jax.ShapeDtypeStruct((H, nb, 4, 1, dp), F32), jax.ShapeDtypeStruct((H, 4, bp, dp), F32)]
    grid, kernel = (H, nb, tp // lt), functools.partial(_tpu_bwd_kernel, lt=lt)
    dx, dR, db, d0 = _call(
        kernel, grid, [sp["x"], sp["R"], sp["b"], sp["kv"], sp["x"], sp["hs"], sp["s"]],
        [sp["x"], sp["dR"], sp["db"], sp["s"]], shapes, [(4, bb, dp), (4, dp, dp), (4, 1, dp)], interpret,
    )(xs.astype(F32), Rs.astype(F32), bs.astype(F32), kv, prev, dhs, gT)
    dx = jnp.transpose(dx[:, :T, :, :B, :D], (3, 1, 2, 0, 4))
    dR = jnp.transpose(jnp.sum(dR, axis=1)[:, :, :D, :D], (0, 2, 1, 3))
    db = jnp.transpose(jnp.sum(db, axis=1)[:, :, 0, :D], (1, 0, 2))
    d0 = tuple(jnp.transpose(d0[:, k, :B, :D], (1, 0, 2)) for k in range(4))
    return dx, dR, db, d0
