"""The ``selective_scan`` GPU forward with each channel's states split over 4 lanes (Mosaic
GPU): every forward with no backward after it, and the training forward where the
backward's layout is "lanes" (``SelectiveScanConfig.bwd_layout``). The packed problem is
:class:`.common.Problem`; the one-lane-per-channel kernels are in :mod:`.gpu_channels`.

Why: the one-lane-per-channel forward runs 8 x 12 = 96 CTAs of 128 channels at Mamba-130m's
shape (batch 8, 1536 channels). That is one warp per scheduler on 96 of the H100's 132 SMs,
and the warp issues only every 2.2 cycles (benchmarks/RESULTS.md, ncu). Here a CTA (one
warpgroup) takes 32 channels and each channel's ``state`` values are split over the 4 lanes of
a quad, ``state / 4`` per lane: 4 times the CTAs (384 at that shape), up to 3 per SM on
all 132 SMs, so 3 warps per scheduler hide each other's latency.

Per chunk of ``chunk`` steps, in three passes, with a warpgroup barrier between them:

1. the chunk's (chunk, 32) tiles in ``_tile_layout`` (warp = row % 4, lane = channel: no bank
   conflicts): ``delta = softplus(dt + dt_bias)`` and ``delta x``, each element once, written
   to shared memory. With the softplus, the steps that pad the sequence get dt = -inf, so
   delta = 0 there.
2. the recurrence in ``_state_layout``, a (32, 4, state / 4) array: lane ``4 (c % 8) + g`` of
   warp ``c // 8`` holds states ``[g L, (g + 1) L)`` of channel ``c`` (``L = state / 4``) as
   one vector. Per row, ``h = exp2(delta a2 + off) h + delta x B``, and the lane's share of
   ``C . h`` (its L products, summed in-thread) goes to a (chunk, 32, 4) shared buffer: no
   shuffles on the recurrence's path. The loads of ``lanes_group`` rows are issued before
   their arithmetic (ncu on the first version of this kernel: 45% of the stalls waited on
   shared-memory loads).
3. back in the tile layout: the 4 partial sums, ``y = (C . h + D x) silu(z)``, stored from
   registers to HBM (each warp writes 32 consecutive values of a row; no output tiles in
   shared memory).

A training forward runs this kernel too when the backward's layout is "lanes" (``bwd_layout``
"auto", the default, for a state of at most 16): it then also stores each chunk's incoming
state, in its own layout, for the lanes backward (:mod:`.gpu_lanes_bwd`), in tiles of
``lanes_train_chunk`` rows (default twice the backward's chunk) with a bound saved at every
chunk start inside them.
The state is padded to a multiple of 16 (a lane's 4 B values are one 16-byte load).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import Problem, SelectiveScanConfig, gpu_compiler_params, pad_to, sigmoid, softplus

CHANS = 32  # channels per CTA
QUAD = 4  # lanes per channel


def tiled(tiles, warp_dims, lane_dims, vector_dim):
    from jax.experimental.mosaic.gpu import fragmented_array as mfa

    lay = mfa.TiledLayout(mfa.Tiling(tiles), warp_dims=warp_dims, lane_dims=lane_dims, vector_dim=vector_dim,
                          _check_canonical=False)
    return lay.canonicalize()


def pallas_layout(lay):
    """A Mosaic GPU TiledLayout as a Pallas layout."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.Layout.TILED(lay.tiling, warp_dims=lay.warp_dims, lane_dims=lay.lane_dims, vector_dim=lay.vector_dim)


def _state_layout(n):
    """(32, 4, n / 4) channels x lane groups x states: warp = channel // 8, lane = 4 (channel
    % 8) + group, the group's n / 4 states as one vector (contiguous in a (channels, state) array)."""
    return tiled(((CHANS, QUAD, n // QUAD), (8, QUAD, n // QUAD), (1, 1, n // QUAD)), (-9,), (-6, -5), -1)


def _tile_layout(rows, width=None):
    """(rows, 32) chunk tiles (with ``width``: (rows, 32, width), a vector of ``width`` per
    element): warp = row % 4, lane = channel, rows // 4 registers. Each warp reads 32
    consecutive elements of a row, so the loads and stores have no bank conflicts."""
    if width is None:
        return tiled(((rows, CHANS), (QUAD, CHANS), (1, 1)), (-4,), (-3,), -1)
    return tiled(((rows, CHANS, width), (QUAD, CHANS, width), (1, 1, width)), (-6,), (-5,), -1)


def pass_sync(interpret):
    """A warpgroup barrier between passes: a lane reads values other warps wrote (Mosaic GPU's
    interpreter runs ``plgpu.commit_smem``, a barrier with an async-proxy fence)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if interpret:
        plgpu.commit_smem()
        return

    @plgpu.inline_mgpu()
    def _bar(ctx):
        from jax.experimental.mosaic.gpu import utils as mgpu_utils

        mgpu_utils.warpgroup_barrier()

    _bar()


def row_inputs(p: Problem, bc_t, dl_s, dx_s, r, p_row, p_state):
    """Row ``r``'s inputs to the recurrence: delta and delta x (``p_row``: one per channel,
    replicated over the quad), the lane's B and C values (``p_state``), and the reset's exponent
    offset (None without resets). Without the softplus, the padding steps' valid flag (0)
    multiplies delta and delta x."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n, ln = p.n, p.n // QUAD
    dl = plgpu.load(dl_s.at[r], layout=p_row, optimized=False)
    dbx = plgpu.load(dx_s.at[r], layout=p_row, optimized=False)
    if p.time_p != p.time and not p.softplus:
        valid = bc_t[r, (2 * n + 1) // ln, (2 * n + 1) % ln]
        dl, dbx = dl * valid, dbx * valid
    bv = plgpu.load(bc_t.at[r, pl.ds(0, QUAD)], layout=p_state, optimized=False)
    cv = plgpu.load(bc_t.at[r, pl.ds(QUAD, QUAD)], layout=p_state, optimized=False)
    off = bc_t[r, (2 * n + 2) // ln, (2 * n + 2) % ln] if p.has_resets else None
    return dl, dbx, bv, cv, off


def check(p: Problem):
    """The shapes this kernel takes (make_problem pads the state to a multiple of 16)."""
    if p.n % (QUAD * 4):
        raise ValueError(f"the lanes kernels: the state size must be a multiple of {QUAD * 4} (make_problem pads it)")
    if p.chunk % QUAD:
        raise ValueError(f"the lanes kernels: got chunk {p.chunk}, expected a multiple of {QUAD}")


def setup(p: Problem, config: SelectiveScanConfig, group_key: str, rows: int | None = None) -> types.SimpleNamespace:
    """What both lanes kernels build from the problem: the checked row group
    (``config.<group_key>``), the layouts (Pallas form; tiles of ``rows``, default the problem's
    chunk), and the inputs re-laid for 4 lanes per channel: dt with -inf on the padding steps
    under the softplus (softplus(-inf) = 0 and its derivative 0, so delta = 0 there), the
    packed B/C row as (width / ln, ln) so that a lane's B (or C) values are one row of it, and A
    as (channels, group, state)."""
    check(p)
    chunk, ln = rows or p.chunk, p.n // QUAD
    grp = getattr(config, group_key)
    if p.chunk % grp:
        raise ValueError(f"{group_key}: got {grp!r}, expected a positive divisor of the chunk ({p.chunk})")
    S, T = _state_layout(p.n), _tile_layout(chunk)
    lay = {"S": S, "T": T, "T4": _tile_layout(chunk, QUAD), "ROW": S.reduce([1, 2]), "STATE": S.reduce([0]),
           "PART": S.reduce([2]), "TROW": T.reduce([0])}
    padded = p.time_p != p.time
    dt = p.dt.at[:, p.time:, :].set(-jnp.inf) if padded and p.softplus else p.dt
    bcw = p.bc_width + (-p.bc_width) % ln
    return types.SimpleNamespace(
        ln=ln, grp=grp, sshape=(CHANS, QUAD, ln), padded=padded, dt=dt, bcw=bcw, layouts={k: pallas_layout(v) for k, v in lay.items()},
        bc=pad_to(p.bc, 2, ln).reshape(p.batch, p.time_p, bcw // ln, ln), a2=p.a2.T.reshape(p.chans_p, QUAD, ln))


def train_rows(p: Problem, config: SelectiveScanConfig) -> int:
    """The tile rows of the training forward (``config.lanes_train_chunk``): "auto" takes
    twice the backward's chunk (its bounds are still saved every chunk) when the padded length
    allows it, else the chunk; an integer must be a multiple of the chunk that divides the
    padded length."""
    rows = config.lanes_train_chunk
    if rows == "auto":
        return 2 * p.chunk if p.time_p % (2 * p.chunk) == 0 else p.chunk
    if rows < p.chunk or rows % p.chunk or p.time_p % rows:
        raise ValueError(f"lanes_train_chunk: got {rows!r}, expected 'auto' or a multiple of the chunk ({p.chunk}) "
                         f"that divides the padded length ({p.time_p})")
    return rows


def forward(config: SelectiveScanConfig, p: Problem, out_dtype, *, interpret, save_bounds: bool = False):
    """(y (batch, time_p, chans_p), h_last (batch, state, chans_p)), and with ``save_bounds``
    the state at the start of every chunk, (batch, chunks, chans_p, 4, state / 4) (the lanes
    backward's layout, :mod:`.gpu_lanes_bwd`). ``interpret``: Mosaic GPU's
    interpreter (threads and barriers simulated).
    ``config.lanes_group`` rows per group of the recurrence: their shared-memory loads are
    issued before any of their arithmetic, and their partial sums stored after it. With
    ``save_bounds`` the tiles are ``train_rows`` rows (a multiple of the chunk), and the
    bounds are stored at every chunk start inside them."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    stages = config.stages
    chunk = train_rows(p, config) if save_bounds else p.chunk
    su = setup(p, config, "lanes_group", chunk)
    per = chunk // p.chunk  # chunks (bounds) per tile
    batch, nc, nb = p.batch, p.time_p // chunk, p.chans_p // CHANS
    ln, grp, sshape, bcw = su.ln, su.grp, su.sshape, su.bcw
    pS, pT, pT4, pROW, pSTATE, pPART, pTROW = (su.layouts[k] for k in ("S", "T", "T4", "ROW", "STATE", "PART", "TROW"))
    f32 = jnp.float32
    shapes = (jax.ShapeDtypeStruct((batch, p.time_p, p.chans_p), out_dtype),
              jax.ShapeDtypeStruct((batch, p.chans_p, QUAD, ln), f32))
    if save_bounds:
        shapes += (jax.ShapeDtypeStruct((batch, p.n_chunks, p.chans_p, QUAD, ln), f32),)
    # the states as (channels, group, state): each lane's n / 4 states are contiguous
    h0 = jnp.swapaxes(p.h0, 1, 2).reshape(batch, p.chans_p, QUAD, ln)
    ins = [p.x, su.dt] + ([p.z] if p.gated else []) + [su.bc, su.a2, p.params, h0]
    k = 2 + p.gated

    def bcast(v, dims, lay=pS, shape=sshape):
        return plgpu.layout_cast(lax.broadcast_in_dim(v, shape, dims), lay)

    def kernel(*refs):
        nout = len(shapes)
        gin, gout, (dl_s, dx_s, yp_s) = refs[:len(ins)], refs[len(ins):len(ins) + nout], refs[len(ins) + nout:]
        y_ref, hl_ref = gout[0], gout[1]
        bi, ci = lax.axis_index("batch"), lax.axis_index("block")
        lanes = pl.ds(ci * CHANS, CHANS)
        a_ref, pr_ref, h0_ref = gin[k + 1], gin[k + 2], gin[k + 3].at[bi]
        a2v = plgpu.load(a_ref.at[lanes], layout=pS, optimized=False)
        dvec = plgpu.load(pr_ref.at[0, lanes], layout=pTROW, optimized=False)
        bias = plgpu.load(pr_ref.at[1, lanes], layout=pTROW, optimized=False)
        h0v = plgpu.load(h0_ref.at[lanes], layout=pS, optimized=False)
        bias_t = bcast(bias, (1,), pT, (chunk, CHANS))
        d_t = bcast(dvec, (1,), pT, (chunk, CHANS))
        seq = pl.BlockSpec((chunk, CHANS), lambda t: (t, ci))
        bcs = pl.BlockSpec((chunk, bcw // ln, ln), lambda t: (t, 0, 0))

        def step(idx, *tiles_and_carry):
            *tiles, h = tiles_and_carry
            if p.gated:
                x_t, dt_t, z_t, bc_t = tiles
            else:
                (x_t, dt_t, bc_t), z_t = tiles, None
            # 1. delta and delta x for the chunk, each element once
            u = plgpu.load(dt_t, layout=pT, optimized=False).astype(f32) + bias_t
            delta = softplus(u) if p.softplus else u
            dl_s[...] = delta
            dx_s[...] = delta * plgpu.load(x_t, layout=pT, optimized=False).astype(f32)
            pass_sync(interpret)

            # 2. the recurrence, grp rows at a time: loads, then arithmetic, then stores
            def group(gi, h):
                r0 = gi * grp
                rows = []
                for j in range(grp):
                    rows.append(row_inputs(p, bc_t, dl_s, dx_s, r0 + j, pROW, pSTATE))
                parts = []
                for dl, dbx, bv, cv, off in rows:
                    arg = bcast(dl, (0,)) * a2v
                    if off is not None:  # the reset as an offset of the decay's exponent (Problem.bc)
                        arg = arg + off
                    h = jnp.exp2(arg) * h + bcast(dbx, (0,)) * bcast(bv, (1, 2))
                    parts.append(plgpu.layout_cast(jnp.sum(bcast(cv, (1, 2)) * h, axis=2), pPART))
                for j, part in enumerate(parts):
                    yp_s[r0 + j] = part
                return h

            gpc = p.chunk // grp  # groups per chunk
            for c in range(per):
                if save_bounds:  # the chunk's incoming state, for the backward
                    gout[2].at[bi, idx[0] * per + c, lanes][...] = h
                h = lax.fori_loop(c * gpc, (c + 1) * gpc, group, h)
            pass_sync(interpret)
            # 3. the lanes' partial sums, the D skip and the gate
            xv = plgpu.load(x_t, layout=pT, optimized=False).astype(f32)
            yp = plgpu.layout_cast(jnp.sum(plgpu.load(yp_s, layout=pT4, optimized=False), axis=2), pT)
            y = yp + d_t * xv
            if z_t is not None:
                zv = plgpu.load(z_t, layout=pT, optimized=False).astype(f32)
                y = y * zv * sigmoid(zv)
            # straight from registers to HBM: each warp writes 32 consecutive values of a row
            y_ref.at[bi, pl.ds(idx[0] * chunk, chunk), lanes][...] = y.astype(y_ref.dtype)
            return h

        h = plgpu.emit_pipeline(
            step, grid=(nc,), in_specs=[seq] * k + [bcs], max_concurrent_steps=min(stages, nc), init_carry=h0v,
        )(*[g.at[bi] for g in gin[:k + 1]])
        hl_ref.at[bi][lanes] = h

    extra = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    scratch = [plgpu.SMEM((chunk, CHANS), f32), plgpu.SMEM((chunk, CHANS), f32), plgpu.SMEM((chunk, CHANS, QUAD), f32)]
    outs = plgpu.kernel(kernel, out_type=shapes, grid=(batch, nb), grid_names=("batch", "block"),
                        scratch_types=scratch, compiler_params=gpu_compiler_params(config), **extra)(*ins)
    return (outs[0], jnp.swapaxes(outs[1].reshape(batch, p.chans_p, p.n), 1, 2)) + tuple(outs[2:])
