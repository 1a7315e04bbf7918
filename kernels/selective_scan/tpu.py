"""The ``pallas_tpu`` backend of ``selective_scan`` (Mosaic TPU), forward and backward.

Grid (batch, 128-lane channel block, chunk) with the chunk axis "arbitrary" and the
state as a (state, 128) VMEM scratch: state on sublanes, channels on lanes, so each
step is a handful of full-vreg operations. The packed problem (:class:`.common.Problem`:
state padded to a multiple of 8, the B/C/reset row to 128 lanes) and the equations are in
:mod:`.common`; the forward per step (``a2 = A log2 e``)::

    delta = softplus(dt + dt_bias) * valid
    h     = exp2(delta a2) * (keep * h) + delta x B
    y     = (sum_n C_n h_n + D x) silu(z)

saving the state at every chunk start; the backward walks the chunks from last to first,
recomputes the chunk's states from its boundary and runs the adjoint (the formulas of
:mod:`.gpu_channels`), dB and dC summed over the block's lanes in the kernel and over
blocks by XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import (
    LANES,
    LOG2E,
    Problem,
    SelectiveScanConfig,
    pad_cotangents,
    sigmoid,
    softplus,
    unpad_forward,
    unpad_gradients,
)


def _tpu_step_inputs(p: Problem, x_t, dt_t, z_t, bcT, r, dvec, bias):
    n = p.n
    u = dt_t[r : r + 1, :].astype(jnp.float32) + bias
    valid = bcT[2 * n + 1 : 2 * n + 2, r : r + 1]
    delta = (softplus(u) if p.softplus else u) * valid
    xv = x_t[r : r + 1, :].astype(jnp.float32)
    bcol, ccol, keep = bcT[0:n, r : r + 1], bcT[n : 2 * n, r : r + 1], bcT[2 * n : 2 * n + 1, r : r + 1]
    zv = None if z_t is None else z_t[r : r + 1, :].astype(jnp.float32)
    return u, delta, xv, bcol, ccol, keep, zv, valid


def _tpu_fwd_kernel(*refs, p: Problem, save_bounds: bool):
    if p.gated:
        x_t, dt_t, z_t, bc_t, a_t, pr_t, h0_t, y_t, hl_t, *rest = refs
    else:
        (x_t, dt_t, bc_t, a_t, pr_t, h0_t, y_t, hl_t, *rest), z_t = refs, None
    *bnd, h_s = rest

    @pl.when(pl.program_id(2) == 0)
    def _():
        h_s[...] = h0_t[...]

    if save_bounds:
        bnd[0][...] = h_s[...]
    a2 = a_t[...]
    dvec, bias = pr_t[0:1, :], pr_t[1:2, :]
    bcT = bc_t[...].T
    h = h_s[...]
    rows = []
    for r in range(p.chunk):
        u, delta, xv, bcol, ccol, keep, zv, _ = _tpu_step_inputs(p, x_t, dt_t, z_t, bcT, r, dvec, bias)
        h = jnp.exp2(delta * a2) * (keep * h) + (delta * xv) * bcol
        y = jnp.sum(ccol * h, axis=0, keepdims=True) + dvec * xv
        if zv is not None:
            y = y * zv * sigmoid(zv)
        rows.append(y)
    y_t[...] = jnp.concatenate(rows, axis=0).astype(y_t.dtype)
    h_s[...] = h
    hl_t[...] = h


def _tpu_bwd_kernel(*refs, p: Problem):
    if p.gated:
        x_t, dt_t, z_t, bc_t, gy_t, a_t, pr_t, bnd_t, ghl_t, dx_t, ddt_t, dz_t, dbc_t, da_t, dp_t, dh0_t, gh_s, da_s, dp_s = refs
    else:
        (x_t, dt_t, bc_t, gy_t, a_t, pr_t, bnd_t, ghl_t, dx_t, ddt_t, dbc_t, da_t, dp_t, dh0_t, gh_s, da_s, dp_s), z_t, dz_t = refs, None, None

    @pl.when(pl.program_id(2) == 0)
    def _():
        gh_s[...] = ghl_t[...]
        da_s[...] = jnp.zeros_like(da_s)
        dp_s[...] = jnp.zeros_like(dp_s)

    n, chunk = p.n, p.chunk
    a2 = a_t[...]
    dvec, bias = pr_t[0:1, :], pr_t[1:2, :]
    bcT = bc_t[...].T
    ln2 = 1.0 / LOG2E
    # recompute the chunk's states from its boundary
    h, hprev = bnd_t[...], []
    for r in range(chunk):
        u, delta, xv, bcol, ccol, keep, zv, _ = _tpu_step_inputs(p, x_t, dt_t, z_t, bcT, r, dvec, bias)
        hprev.append(h)
        h = jnp.exp2(delta * a2) * (keep * h) + (delta * xv) * bcol
    gh, dA, dp = gh_s[...], da_s[...], dp_s[...]
    lane = lax.broadcasted_iota(jnp.int32, (n, chunk), 1)
    dB = jnp.zeros((n, chunk), jnp.float32)
    dC = jnp.zeros((n, chunk), jnp.float32)
    dx_rows, du_rows, dz_rows = [None] * chunk, [None] * chunk, [None] * chunk
    for r in reversed(range(chunk)):
        u, delta, xv, bcol, ccol, keep, zv, valid = _tpu_step_inputs(p, x_t, dt_t, z_t, bcT, r, dvec, bias)
        gy = gy_t[r : r + 1, :].astype(jnp.float32)
        decay = jnp.exp2(delta * a2)
        hk = decay * (keep * hprev[r]) + (delta * xv) * bcol
        if zv is not None:
            sg = sigmoid(zv)
            ypre = jnp.sum(ccol * hk, axis=0, keepdims=True) + dvec * xv
            dz_rows[r] = gy * ypre * sg * (1.0 + zv * (1.0 - sg))
            gy = gy * zv * sg
        g = gh + ccol * gy
        dC = jnp.where(lane == r, jnp.sum(hk * gy, axis=1, keepdims=True), dC)
        dB = jnp.where(lane == r, jnp.sum(g * (delta * xv), axis=1, keepdims=True), dB)
        gb = jnp.sum(g * bcol, axis=0, keepdims=True)
        dh_decay = g * decay * keep * hprev[r]
        ddelta = jnp.sum(dh_decay * a2, axis=0, keepdims=True) * ln2 + gb * xv
        du = (ddelta * sigmoid(u) if p.softplus else ddelta) * valid
        dx_rows[r] = gy * dvec + gb * delta
        du_rows[r] = du
        dA = dA + dh_decay * delta
        dp = dp + jnp.concatenate([gy * xv, du], axis=0)
        gh = g * decay * keep
    dx_t[...] = jnp.concatenate(dx_rows, axis=0).astype(dx_t.dtype)
    ddt_t[...] = jnp.concatenate(du_rows, axis=0).astype(ddt_t.dtype)
    if dz_t is not None:
        dz_t[...] = jnp.concatenate(dz_rows, axis=0).astype(dz_t.dtype)
    pad = jnp.zeros((p.bc_width - 2 * n, chunk), jnp.float32)
    dbc_t[...] = jnp.concatenate([dB, dC, pad], axis=0).T
    gh_s[...], da_s[...], dp_s[...] = gh, dA, dp
    da_t[...], dp_t[...], dh0_t[...] = dA, dp, gh


def _tpu_specs(p: Problem, reverse_time: bool):
    nc = p.n_chunks

    def t_of(t):
        return nc - 1 - t if reverse_time else t

    return {
        "seq": pl.BlockSpec((None, p.chunk, LANES), lambda b, c, t: (b, t_of(t), c)),
        "bc": pl.BlockSpec((None, p.chunk, p.bc_width), lambda b, c, t: (b, t_of(t), 0)),
        "dbc": pl.BlockSpec((None, None, p.chunk, p.bc_width), lambda b, c, t: (b, c, t_of(t), 0)),
        "st": pl.BlockSpec((None, p.n, LANES), lambda b, c, t: (b, 0, c)),
        "two": pl.BlockSpec((None, 2, LANES), lambda b, c, t: (b, 0, c)),
        "a": pl.BlockSpec((p.n, LANES), lambda b, c, t: (0, c)),
        "par": pl.BlockSpec((2, LANES), lambda b, c, t: (0, c)),
        "bnd": pl.BlockSpec((None, None, p.n, LANES), lambda b, c, t: (b, t_of(t), 0, c)),
    }


def _tpu_params():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def make_problem(config: SelectiveScanConfig, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk=None,
                 training=True) -> Problem:
    """The kernels' Problem (``chunk``, or ``config.tpu_chunk``, steps per grid step)."""
    del training  # both passes take the same chunk
    return Problem(x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk or config.tpu_chunk, softplus, state_multiple=8,
                   bc_multiple=LANES)


def _interpret(interpret):
    if interpret:
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return False


def forward(config: SelectiveScanConfig, p: Problem, out_dtype, *, save_bounds=False, interpret=False):
    """(y (batch, time, chans), h_last (batch, chans, state), bounds or None)."""
    del config  # the chunk is the problem's
    outs = _forward(p, out_dtype, save_bounds=save_bounds, interpret=_interpret(interpret))
    y, h_last = unpad_forward(p, outs[0], outs[1])
    return y, h_last, (outs[2] if save_bounds else None)


def backward(config: SelectiveScanConfig, p: Problem, gy, gh_last, bounds, dtypes, *, interpret=False):
    """Gradients: dict with x, dt, z, B, C, A, D, dt_bias, h0 (unpadded)."""
    del config
    gy, ghl = pad_cotangents(p, gy, gh_last)
    return unpad_gradients(p, _backward(p, gy, bounds, ghl, dtypes, interpret=_interpret(interpret)))


def _forward(p: Problem, out_dtype, *, save_bounds: bool, interpret):
    from jax.experimental.pallas import tpu as pltpu

    sp = _tpu_specs(p, False)
    shapes = [jax.ShapeDtypeStruct((p.batch, p.time_p, p.chans_p), out_dtype),
              jax.ShapeDtypeStruct((p.batch, p.n, p.chans_p), jnp.float32)]
    if save_bounds:
        shapes.append(jax.ShapeDtypeStruct((p.batch, p.n_chunks, p.n, p.chans_p), jnp.float32))
    ins = [p.x, p.dt] + ([p.z] if p.gated else []) + [p.bc, p.a2, p.params, p.h0]
    return pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, p=p, save_bounds=save_bounds),
        grid=(p.batch, p.n_blocks, p.n_chunks),
        in_specs=[sp["seq"], sp["seq"]] + ([sp["seq"]] if p.gated else []) + [sp["bc"], sp["a"], sp["par"], sp["st"]],
        out_specs=[sp["seq"], sp["st"]] + ([sp["bnd"]] if save_bounds else []),
        out_shape=shapes,
        scratch_shapes=[pltpu.VMEM((p.n, LANES), jnp.float32)],
        compiler_params=_tpu_params(),
        interpret=interpret,
    )(*ins)


def _backward(p: Problem, gy, bounds, gh_last, dtypes, *, interpret):
    from jax.experimental.pallas import tpu as pltpu

    sp = _tpu_specs(p, True)
    seq_shape = (p.batch, p.time_p, p.chans_p)
    shapes = [jax.ShapeDtypeStruct(seq_shape, dtypes["x"]), jax.ShapeDtypeStruct(seq_shape, dtypes["dt"])]
    if p.gated:
        shapes.append(jax.ShapeDtypeStruct(seq_shape, dtypes["z"]))
    shapes += [
        jax.ShapeDtypeStruct((p.batch, p.n_blocks, p.time_p, p.bc_width), jnp.float32),
        jax.ShapeDtypeStruct((p.batch, p.n, p.chans_p), jnp.float32),
        jax.ShapeDtypeStruct((p.batch, 2, p.chans_p), jnp.float32),
        jax.ShapeDtypeStruct((p.batch, p.n, p.chans_p), jnp.float32),
    ]
    ins = [p.x, p.dt] + ([p.z] if p.gated else []) + [p.bc, gy, p.a2, p.params, bounds, gh_last]
    return pl.pallas_call(
        functools.partial(_tpu_bwd_kernel, p=p),
        grid=(p.batch, p.n_blocks, p.n_chunks),
        in_specs=[sp["seq"], sp["seq"]] + ([sp["seq"]] if p.gated else []) + [sp["bc"], sp["seq"], sp["a"], sp["par"], sp["bnd"], sp["st"]],
        out_specs=[sp["seq"], sp["seq"]] + ([sp["seq"]] if p.gated else []) + [sp["dbc"], sp["st"], sp["two"], sp["st"]],
        out_shape=shapes,
        scratch_shapes=[pltpu.VMEM((p.n, LANES), jnp.float32), pltpu.VMEM((p.n, LANES), jnp.float32),
                        pltpu.VMEM((2, LANES), jnp.float32)],
        compiler_params=_tpu_params(),
        interpret=interpret,
    )(*ins)
