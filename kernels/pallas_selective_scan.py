"""Pallas kernels for ``selective_scan`` (Mamba's S6) on GPU and TPU, forward and backward.

Both kernels are fused: softplus(dt + dt_bias), ``exp(dt A)``, ``dt B x``, ``C . h``,
the ``D`` skip and the ``silu(z)`` gate all happen on chip, and the state (per
channel, ``state`` values) lives in float32 registers / VMEM across the whole
sequence. Nothing of shape (batch, time, channels, state) is ever written to HBM.
Inputs are read once per pass in chunks of ``chunk`` time steps and ``y`` is written
once.

Layout: channels go on the 128 lanes (one CTA / grid cell per (batch, 128-channel
block)); time is walked in chunks; the per-step shared vectors B_t, C_t and the
reset flag are packed as one float32 row ``bc = [B_t, C_t, keep_t, valid_t, off_t, 0...]``
(``off_t``: the reset as an offset of the decay's exponent, ``RESET_OFFSET`` or 0)
so that a chunk of them is one tile (``valid`` is 0 on the steps that pad the
sequence to whole chunks: their dt is zeroed, so the state passes through them).

Forward saves the state at the start of every chunk (``bounds``: (batch, chunks,
state, channels) float32, ``1/chunk`` of the (batch, time, channels, state) the
recurrence touches). The backward kernel walks the chunks from last to first,
recomputes the chunk's states from its boundary (kept in a (chunk, state, 128)
scratch), and runs the adjoint recurrence
``g_h(t) = C_t g_y'(t) + Abar_{t+1} keep_{t+1} g_h(t+1)`` with the gradients

* ``dx_t = g_y' D + sum_n g_h,n dt B_n``,
* ``d dt_t = sum_n g_h,n (A_n Abar_n keep_t h_n(t-1) + B_n x_t)`` (then through the
  softplus and the bias),
* ``dA_n += g_h,n dt Abar_n keep_t h_n(t-1)``, ``dD += g_y' x``,
* ``dB_n(t) = sum_channels g_h,n dt x``, ``dC_n(t) = sum_channels h_n(t) g_y'`` (reduced
  over the block's lanes in the kernel, over blocks by XLA),
* ``dh0 = Abar_0 keep_0 g_h(0)``,

where ``g_y' = g_y silu(z)`` and ``dz = g_y y' silu'(z)``.

The problem and the per-row math are in :mod:`mnemax.kernels.pallas_selective_scan_rows`.

* ``pallas_gpu``: Mosaic GPU, one warpgroup per CTA, ``plgpu.emit_pipeline`` streams
  the tiles by TMA ``stages`` chunks ahead. ``interpret=True`` runs the same
  per-chunk bodies through ``pl.pallas_call``'s interpreter (CPU).
* ``pallas_tpu``: Mosaic TPU, grid (batch, lane block, chunk) with the chunk axis
  "arbitrary" and the state as a (state, 128) VMEM scratch: state on sublanes,
  channels on lanes (the kernels are in :mod:`mnemax.kernels.pallas_selective_scan_tpu`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .pallas_selective_scan_rows import LANES, Problem, _bwd_rows, _fwd_rows, _pad_to


# ----------------------------------------------------------------------------- GPU


GPU_OPTIONS = {"chunk": 8, "stages": 3, "bwd_stages": 2, "unroll": 4, "bwd_unroll": 2, "approx_math": True,
               "no_auto_barriers": True, "red_rows": 4, "red_layout": "row4", "fwd_wgs": 1, "fwd_chunk": "auto",
               "time_split": "auto", "mosaic_interpret": False, "fwd_unroll": 8, "sum_parts": 1,
               "fwd_layout": "lanes", "lanes_group": 8,
               "bwd_layout": "auto", "lanes_bwd_group": 4, "lanes_bwd_dbc": "reduce",
               "lanes_train_chunk": "auto"}
# bwd_layout: the training forward's and the backward's layout. "channels" (one lane per channel);
# "lanes": ``pallas_selective_scan_lanes_bwd``, after a lanes forward that saves its
# chunk-boundary states in the lanes layout (state at most 16); "auto" (default): "lanes" for a
# state of at most 16, else "channels". On an H100 at (8, 2048, 1536, 16), f32, forward+backward
# 1.156 ms against 1.869 for "channels" (2.96x / 4.79x the HBM floor, same run; RESULTS.md).
# lanes_bwd_group: its rows whose loads are issued together (1.259 ms at 1 row, 1.234 at 4, 2:
# same as 4, 8: 1.609, before the changes below). lanes_bwd_dbc: "reduce" (TMA reduce-add of
# each chunk's dB/dC sums into one buffer; 1.194 ms) or "rows" (per-CTA rows summed by XLA;
# 1.229 ms, same run). lanes_train_chunk: the training forward's tile rows, "auto" = twice the
# chunk where the length allows (1.156 ms against 1.165 at 8, same run).
# fwd_layout: the forward-only kernel's layout (a forward with a backward after it uses
# bwd_layout's; a forward-only call with fwd_wgs > 1 uses "channels"). "channels": one lane per channel walks all its states, 128 channels per CTA
# (``_gpu_forward``). "lanes": each channel's states split over the 4 lanes of a quad, 32
# channels per CTA, so 4 times the CTAs and up to 3 warps per scheduler
# (``pallas_selective_scan_lanes``); the state is zero-padded to a multiple of 16. On an H100 at
# (8, 2048, 1536, 16), f32, chunk 16: 0.238 ms against 0.307 for "channels" (1.69x / 2.2x the HBM
# floor); bf16 chunk 32 0.231 / 0.317 (kernel alone); at (1, 65536, 1536, 16) bf16 3.37 / 9.65 ms
# without the time split (benchmarks/RESULTS.md). lanes_group: the rows of its recurrence whose
# loads are issued before their arithmetic (4: 0.259 ms, 8: 0.248, 16: 0.247 at the shape above).
FWD_LAYOUTS = ("channels", "lanes")
# sum_parts: the per-row sums over the states (C.h in both passes; sum_k g_k B_k and the decay
# term of ddelta in the backward) as that many interleaved partial sums. Tried because ncu
# (H100, commit 97e1988) showed 1 warp per scheduler issuing every 2.2 cycles with 35% of the
# stalls on fixed-latency dependencies; it is slower (same run, commit 2eb0416, f32: forward
# 0.341 / 0.382 / 0.371 ms at 1 / 2 / 4 parts, forward+backward 1.931 / 2.037 ms at 1 / 4), so 1.
# fwd_unroll: the rows unrolled per loop iteration of a forward with no backward (``unroll`` is
# the training forward's and the backward's). On an H100 at (8, 2048, 1536, 16), f32, chunk 16
# (commit 19c87f8): 0.402 ms at unroll 4, 0.356 at 8; bf16 chunk 32: 0.401 / 0.337.
# mosaic_interpret: with interpret=True, run the forward's Mosaic GPU kernel itself under Mosaic
# GPU's interpreter (threads, barriers, TMA simulated; slow) instead of the grid emulation.
# time_split: segments of the sequence scanned in parallel (mnemax.kernels.selective_scan's
# _split_scan): 1 = off; an integer S; "auto" = as many as fill the GPU's SMs when batch x
# channel blocks leaves most of them idle (batch 1 at 1536 channels: 12 CTAs on 132 SMs),
# at least 4 and segments of at least 512 steps. It costs about twice the arithmetic, so it
# pays only where the SMs are idle. On an H100 at (1, 65536, 1536, 16) bf16 (11 segments):
# forward 9.85 -> 3.45 ms, forward+backward 62.0 -> 18.5 ms (benchmarks/RESULTS.md).
# fwd_chunk: the chunk of the forward when no backward follows (inference, prefill, eval; with
# a backward both use ``chunk``, since the backward restarts from the forward's chunk-boundary
# states). "auto": 32 steps for 16-bit sequences, 16 for float32. On an H100 at (8, 2048, 1536,
# 16) f32 0.443 ms at chunk 8, 0.384 at 16 (commit 2535934); with the constants out of the
# pipeline (19c87f8) and 8 rows unrolled, f32 0.356 at 16 but 0.399 at 32 (which now fits
# shared memory), bf16 0.337 at 32, 0.334 at 64 with 2 stages (benchmarks/RESULTS.md).
# fwd_wgs: compute warpgroups per CTA in the forward. 1: one warpgroup walks all states of its
# 128 channels (``_gpu_forward``). S > 1: the states are split over S warpgroups (state / S
# each) that share the chunk tiles a producer warpgroup loads by TMA and sum their partial
# C.h rows through shared memory every chunk (``pallas_selective_scan_wg``): S times the warps per
# SM. On an H100 at (8, 2048, 1536, 16) it did not help (f32: 0.441 ms with 1, 0.464 with 2,
# 0.458 with 4; benchmarks/RESULTS.md): the kernel is bound by a per-SM throughput (the SFU
# exp2s and broadcast B/C loads), not by latency, so 1 stays the default.

# Register layouts for the backward's batched lane sums of a (rows, 128) float32 scratch, and
# the row multiple each needs. "wgmma": a quad of lanes holds a row's 8-column groups (in-thread
# sums, 2 shuffles; its loads hit 8-way bank conflicts: 8 rows 512 bytes apart per load).
# "row4": each warp reads whole rows, 4 columns per lane (conflict-free 16-byte loads, 5
# shuffles per row). "row8": 2 rows per warp load, 8 columns per lane (4 shuffles). On an
# H100 at (8, 2048, 1536, 16) f32, fwd+bwd: row4 2.13 ms, row8 2.22, wgmma 2.43, and 6.07
# with per-step sums (red_rows 0) (benchmarks/RESULTS.md).
RED_LAYOUTS = {"wgmma": 64, "row4": 4, "row8": 8}


def _red_layout(name):
    """The register layout ``name`` (a key of RED_LAYOUTS; make_problem has checked it)."""
    from jax.experimental.mosaic.gpu import fragmented_array as mfa
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiled = {"row4": (((4, 128), (4,)), (-3,), (-2,)), "row8": (((8, 128), (2, 128), (8,)), (-5,), (-3, -2))}
    if name == "wgmma":
        return plgpu.Layout.WGMMA
    tiles, warps, lanes = tiled[name]
    return plgpu.Layout.TILED(mfa.Tiling(tiles), warp_dims=warps, lane_dims=lanes, vector_dim=-1)


def _gpu_params(opts):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.CompilerParams(approx_math=opts["approx_math"], unsafe_no_auto_barriers=opts["no_auto_barriers"])


def _gpu_forward(p: Problem, out_dtype, *, save_bounds: bool, stages: int, interpret: bool, opts=None):
    opts = {**GPU_OPTIONS, **(opts or {})}
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, chunk, n, nc, nb = p.batch, p.chunk, p.n, p.n_chunks, p.n_blocks
    shapes = [jax.ShapeDtypeStruct((batch, p.time_p, p.chans_p), out_dtype),
              jax.ShapeDtypeStruct((batch, n, p.chans_p), jnp.float32)]
    if save_bounds:
        shapes.append(jax.ShapeDtypeStruct((batch, nc, n, p.chans_p), jnp.float32))
    ins = [p.x, p.dt] + ([p.z] if p.gated else []) + [p.bc, p.a2, p.params, p.h0]

    def body(tiles, h, first):
        if p.gated:
            x_t, dt_t, z_t, bc_t, a_t, pr_t, h0_t, y_t, hl_t, *bnd = tiles
        else:
            (x_t, dt_t, bc_t, a_t, pr_t, h0_t, y_t, hl_t, *bnd), z_t = tiles, None
        a2 = [a_t[i] for i in range(n)]
        h = tuple(hi + first * h0_t[i] for i, hi in enumerate(h))
        if bnd:
            for i in range(n):
                bnd[0][i] = h[i]
        h = _fwd_rows(p, x_t, dt_t, z_t, bc_t, a2, pr_t[0], pr_t[1], y_t, h)
        for i in range(n):
            hl_t[i] = h[i]
        return h

    if interpret and interpret != "mosaic":
        seq = pl.BlockSpec((None, chunk, LANES), lambda b, c, t: (b, t, c))
        bcs = pl.BlockSpec((None, chunk, p.bc_width), lambda b, c, t: (b, t, 0))
        st = pl.BlockSpec((None, n, LANES), lambda b, c, t: (b, 0, c))
        par = [pl.BlockSpec((n, LANES), lambda b, c, t: (0, c)), pl.BlockSpec((2, LANES), lambda b, c, t: (0, c))]
        bnd = pl.BlockSpec((None, None, n, LANES), lambda b, c, t: (b, t, 0, c))

        def kernel(*refs):
            *tiles, carry = refs
            is_first = pl.program_id(2) == 0
            h = tuple(jnp.where(is_first, 0.0, carry[i]) for i in range(n))
            h = body(tiles, h, is_first.astype(jnp.float32))
            for i in range(n):
                carry[i] = h[i]

        return pl.pallas_call(
            kernel, grid=(batch, nb, nc),
            in_specs=[seq, seq] + ([seq] if p.gated else []) + [bcs] + par + [st],
            out_specs=[seq, st] + ([bnd] if save_bounds else []), out_shape=shapes,
            scratch_shapes=[plgpu.SMEM((n, LANES), jnp.float32)], interpret=True,
        )(*ins)

    # Mosaic GPU. The per-block constants (A, D, dt_bias) and h0 are read from HBM into
    # registers once and the final state is written once at the end, so the pipeline's
    # tiles hold only the sequence (index-invariant tiles would be fetched by TMA again
    # every chunk and take a slot of shared memory per stage).
    def kernel(*refs):
        bi, ci = lax.axis_index("batch"), lax.axis_index("block")
        seq = pl.BlockSpec((chunk, LANES), lambda t: (t, ci))
        bcs = pl.BlockSpec((chunk, p.bc_width), lambda t: (t, 0))
        bnd = pl.BlockSpec((None, n, LANES), lambda t: (t, 0, ci))
        k = 2 + p.gated  # x, dt, (z)
        gin, gout = refs[:len(ins)], refs[len(ins):]
        a_ref, pr_ref, h0_ref = gin[k + 1], gin[k + 2], gin[k + 3].at[bi]
        lanes = pl.ds(ci * LANES, LANES)
        a2 = [a_ref[i, lanes] for i in range(n)]
        dvec, bias = pr_ref[0, lanes], pr_ref[1, lanes]
        h0 = tuple(h0_ref[i, lanes] for i in range(n))

        def step(idx, *tiles_and_carry):
            *tiles, h = tiles_and_carry
            if p.gated:
                x_t, dt_t, z_t, bc_t, y_t, *bnd_t = tiles
            else:
                (x_t, dt_t, bc_t, y_t, *bnd_t), z_t = tiles, None
            if bnd_t:
                for i in range(n):
                    bnd_t[0][i] = h[i]
            return _fwd_rows(p, x_t, dt_t, z_t, bc_t, a2, dvec, bias, y_t, h)

        h = plgpu.emit_pipeline(
            step, grid=(nc,),
            in_specs=[seq] * k + [bcs],
            out_specs=[seq] + ([bnd] if save_bounds else []),
            max_concurrent_steps=stages, init_carry=h0,
        )(*[g.at[bi] for g in gin[:k + 1]], gout[0].at[bi], *([gout[2].at[bi]] if save_bounds else []))
        hl_ref = gout[1].at[bi]
        for i in range(n):
            hl_ref[i, lanes] = h[i]

    extra = {"interpret": plgpu.InterpretGPUParams()} if interpret == "mosaic" else {}
    return plgpu.kernel(kernel, out_type=tuple(shapes), grid=(batch, nb), grid_names=("batch", "block"),
                        compiler_params=_gpu_params(opts), **extra)(*ins)


def _gpu_backward(p: Problem, gy, bounds, gh_last, dtypes, *, stages: int, interpret: bool, opts=None):
    """Returns dx, ddt_raw, dz (or None), dbc partials (batch, blocks, time_p, bc_width; with
    ``p.red_rows``: (batch, blocks, time_p // red_rows, rows_pad)), dA partials (batch,
    state, chans_p), dD/dbias partials (batch, 2, chans_p), dh0."""
    opts = {**GPU_OPTIONS, **(opts or {})}
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, chunk, n, nc, nb = p.batch, p.chunk, p.n, p.n_chunks, p.n_blocks
    rr = p.red_rows
    # dB/dC partial sums per lane block: one row per step, or one row per red_rows steps
    dbc_tile = (chunk // rr, p.rows_pad) if rr else (chunk, p.bc_width)
    pbuf_shape = [plgpu.SMEM((p.rows_pad, LANES), jnp.float32)] if rr else []

    def lane_sums(pbuf):
        if interpret:
            return jnp.sum(pbuf[...], axis=1)
        plgpu.commit_smem()  # every thread's lane products are in
        v = plgpu.load(pbuf, layout=_red_layout(opts["red_layout"]), optimized=False)
        sums = jnp.sum(v, axis=1)
        plgpu.commit_smem()  # every thread has read them before the next group overwrites them
        return sums

    seq_shape = (batch, p.time_p, p.chans_p)
    shapes = [jax.ShapeDtypeStruct(seq_shape, dtypes["x"]), jax.ShapeDtypeStruct(seq_shape, dtypes["dt"])]
    if p.gated:
        shapes.append(jax.ShapeDtypeStruct(seq_shape, dtypes["z"]))
    shapes += [
        jax.ShapeDtypeStruct((batch, nb, nc * dbc_tile[0], dbc_tile[1]), jnp.float32),
        jax.ShapeDtypeStruct((batch, n, p.chans_p), jnp.float32),  # dA
        jax.ShapeDtypeStruct((batch, 2, p.chans_p), jnp.float32),  # dD, dbias
        jax.ShapeDtypeStruct((batch, n, p.chans_p), jnp.float32),  # dh0
    ]
    ins = [p.x, p.dt] + ([p.z] if p.gated else []) + [p.bc, gy, p.a2, p.params, bounds, gh_last]

    def core(seq_tiles, a2, dvec, bias, hbuf, carry, pbuf):
        """One chunk: recompute its states from the boundary, then the adjoint rows."""
        if p.gated:
            x_t, dt_t, z_t, bc_t, gy_t, bnd_t, dx_t, ddt_t, dz_t, dbc_t = seq_tiles
        else:
            (x_t, dt_t, bc_t, gy_t, bnd_t, dx_t, ddt_t, dbc_t), z_t, dz_t = seq_tiles, None, None
        _fwd_rows(p, x_t, dt_t, z_t, bc_t, a2, dvec, bias, None, tuple(bnd_t[i] for i in range(n)), hbuf=hbuf)
        return _bwd_rows(p, x_t, dt_t, z_t, bc_t, gy_t, a2, dvec, bias, hbuf, dx_t, ddt_t, dz_t, dbc_t, carry,
                         pbuf=pbuf, lane_sums=lane_sums)

    def body(tiles, hbuf, carry, first, pbuf=None):
        """Interpret mode: the per-block constants and per-block results are pipeline tiles."""
        if p.gated:
            x_t, dt_t, z_t, bc_t, gy_t, a_t, pr_t, bnd_t, ghl_t, dx_t, ddt_t, dz_t, dbc_t, da_t, dp_t, dh0_t = tiles
            seq_tiles = (x_t, dt_t, z_t, bc_t, gy_t, bnd_t, dx_t, ddt_t, dz_t, dbc_t)
        else:
            x_t, dt_t, bc_t, gy_t, a_t, pr_t, bnd_t, ghl_t, dx_t, ddt_t, dbc_t, da_t, dp_t, dh0_t = tiles
            seq_tiles = (x_t, dt_t, bc_t, gy_t, bnd_t, dx_t, ddt_t, dbc_t)
        gh0, dA0, dD0, db0 = carry
        carry = (tuple(g + first * ghl_t[i] for i, g in enumerate(gh0)), dA0, dD0, db0)
        gh, dA, dD, dbias = core(seq_tiles, [a_t[i] for i in range(n)], pr_t[0], pr_t[1], hbuf, carry, pbuf)
        for i in range(n):
            da_t[i] = dA[i]
            dh0_t[i] = gh[i]
        dp_t[0] = dD
        dp_t[1] = dbias
        return gh, dA, dD, dbias

    if interpret:
        seq = pl.BlockSpec((None, chunk, LANES), lambda b, c, t: (b, nc - 1 - t, c))
        bcs = pl.BlockSpec((None, chunk, p.bc_width), lambda b, c, t: (b, nc - 1 - t, 0))
        dbcs = pl.BlockSpec((None, None, *dbc_tile), lambda b, c, t: (b, c, nc - 1 - t, 0))
        st = pl.BlockSpec((None, n, LANES), lambda b, c, t: (b, 0, c))
        two = pl.BlockSpec((None, 2, LANES), lambda b, c, t: (b, 0, c))
        par = [pl.BlockSpec((n, LANES), lambda b, c, t: (0, c)), pl.BlockSpec((2, LANES), lambda b, c, t: (0, c))]
        bnd = pl.BlockSpec((None, None, n, LANES), lambda b, c, t: (b, nc - 1 - t, 0, c))

        def kernel(*refs):
            if rr:
                *tiles, hbuf, cst, pbuf = refs
            else:
                (*tiles, hbuf, cst), pbuf = refs, None
            is_first = pl.program_id(2) == 0
            z = jnp.zeros((LANES,), jnp.float32)
            rd = lambda i: jnp.where(is_first, z, cst[i])  # noqa: E731 - scratch starts uninitialised
            carry = (tuple(rd(i) for i in range(n)), tuple(rd(n + i) for i in range(n)), rd(2 * n), rd(2 * n + 1))
            gh, dA, dD, dbias = body(tiles, hbuf, carry, is_first.astype(jnp.float32), pbuf)
            for i, v in enumerate(list(gh) + list(dA) + [dD, dbias]):
                cst[i] = v

        return pl.pallas_call(
            kernel, grid=(batch, nb, nc),
            in_specs=[seq, seq] + ([seq] if p.gated else []) + [bcs, seq] + par + [bnd, st],
            out_specs=[seq, seq] + ([seq] if p.gated else []) + [dbcs, st, two, st], out_shape=shapes,
            scratch_shapes=[plgpu.SMEM((chunk, n, LANES), jnp.float32), plgpu.SMEM((2 * n + 2, LANES), jnp.float32)] + pbuf_shape,
            interpret=True,
        )(*ins)

    @functools.partial(
        plgpu.kernel, out_type=tuple(shapes), grid=(batch, nb), grid_names=("batch", "block"),
        scratch_types=[plgpu.SMEM((chunk, n, LANES), jnp.float32)] + pbuf_shape, compiler_params=_gpu_params(opts),
    )
    def kernel(*refs):
        # The per-block constants (A, D, dt_bias, the final state's cotangent) are read from
        # HBM into registers once, and the per-block results (dA, dD, dt_bias, dh0) written
        # once at the end, so the pipeline's double-buffered tiles hold only the sequence.
        bi, ci = lax.axis_index("batch"), lax.axis_index("block")
        seq = pl.BlockSpec((chunk, LANES), lambda t: (nc - 1 - t, ci))
        bcs = pl.BlockSpec((chunk, p.bc_width), lambda t: (nc - 1 - t, 0))
        dbcs = pl.BlockSpec(dbc_tile, lambda t: (nc - 1 - t, 0))
        bnd = pl.BlockSpec((None, n, LANES), lambda t: (nc - 1 - t, 0, ci))
        n_in = len(ins)
        n_scratch = 1 + bool(rr)
        gin, gout = refs[:n_in], refs[n_in:-n_scratch]
        hbuf, pbuf = refs[-n_scratch], (refs[-1] if rr else None)
        k = 3 + p.gated  # x, dt, (z), bc are per batch; then gy per batch; then a2, params shared; bounds per batch
        a_ref, pr_ref, ghl_ref = gin[k + 1], gin[k + 2], gin[k + 4].at[bi]
        lanes = pl.ds(ci * LANES, LANES)
        a2 = [a_ref[i, lanes] for i in range(n)]
        dvec, bias = pr_ref[0, lanes], pr_ref[1, lanes]
        zero = jnp.zeros((LANES,), jnp.float32)
        init = (tuple(ghl_ref[i, lanes] for i in range(n)), tuple(zero for _ in range(n)), zero, zero)
        per_batch_in = [g.at[bi] for g in gin[:k]] + [gin[k].at[bi], gin[k + 3].at[bi]]
        nseq_out = 2 + p.gated
        per_batch_out = [g.at[bi] for g in gout[:nseq_out]] + [gout[nseq_out].at[bi, ci]]

        def step(idx, *tiles_and_carry):
            *tiles, carry = tiles_and_carry  # x, dt, (z), bc, gy, bounds, dx, ddt, (dz), dbc
            return core(tuple(tiles), a2, dvec, bias, hbuf, carry, pbuf)

        gh, dA, dD, dbias = plgpu.emit_pipeline(
            step, grid=(nc,),
            in_specs=[seq, seq] + ([seq] if p.gated else []) + [bcs, seq, bnd],
            out_specs=[seq, seq] + ([seq] if p.gated else []) + [dbcs],
            max_concurrent_steps=stages, init_carry=init,
        )(*per_batch_in, *per_batch_out)
        da_ref, dp_ref, dh0_ref = (g.at[bi] for g in gout[nseq_out + 1:])
        for i in range(n):
            da_ref[i, lanes] = dA[i]
            dh0_ref[i, lanes] = gh[i]
        dp_ref[0, lanes] = dD
        dp_ref[1, lanes] = dbias

    return kernel(*ins)


# ----------------------------------------------------------------------------- entry points


def _forward_chunk(opts, x, dt, B, C, z) -> int:
    """The GPU forward-only chunk (``GPU_OPTIONS["fwd_chunk"]``)."""
    if opts["fwd_chunk"] == "auto":
        narrow = all(jnp.dtype(v.dtype).itemsize == 2 for v in (x, dt, B, C) + ((z,) if z is not None else ()))
        return 32 if narrow else 16
    if not isinstance(opts["fwd_chunk"], int) or opts["fwd_chunk"] < 1:
        raise ValueError(f"fwd_chunk: got {opts['fwd_chunk']!r}, expected 'auto' or a positive integer")
    return opts["fwd_chunk"]


def bwd_layout(opts, n: int) -> str:
    """The training forward's and backward's layout for a state of ``n`` (``opts["bwd_layout"]``;
    "auto": "lanes" up to 16 states, else "channels")."""
    lay = opts["bwd_layout"]
    if lay == "auto":
        return "lanes" if n <= 16 else "channels"
    if lay not in FWD_LAYOUTS:
        raise ValueError(f"bwd_layout: got {lay!r}, expected 'auto' or one of {FWD_LAYOUTS}")
    return lay


def make_problem(platform, x, dt, A, B, C, D, z, dt_bias, h0, resets, softplus, chunk=None, opts=None, training=True):
    """The kernels' Problem. ``training=False``: a forward with no backward after it (on GPU
    its chunk is ``fwd_chunk`` unless ``chunk`` is given)."""
    if platform == "tpu":
        return Problem(x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk or 16, softplus, state_multiple=8, bc_multiple=LANES)
    opts = {**GPU_OPTIONS, **(opts or {})}
    chunk = chunk or (opts["chunk"] if training else _forward_chunk(opts, x, dt, B, C, z))
    red_rows = min(opts["red_rows"], chunk)
    while red_rows and chunk % red_rows:  # the largest divisor of the chunk up to the option
        red_rows -= 1
    if opts["red_layout"] not in RED_LAYOUTS:
        raise ValueError(f"red_layout: got {opts['red_layout']!r}, expected one of {sorted(RED_LAYOUTS)}")
    wgs = opts["fwd_wgs"]
    if not isinstance(wgs, int) or not 1 <= wgs <= 7 or chunk % wgs:
        # at most 7: a CTA holds at most 1024 threads, 8 warpgroups with the loading one
        raise ValueError(f"fwd_wgs: got {wgs!r}, expected an integer in 1..7 that divides the chunk ({chunk})")
    if opts["fwd_layout"] not in FWD_LAYOUTS:
        raise ValueError(f"fwd_layout: got {opts['fwd_layout']!r}, expected one of {FWD_LAYOUTS}")
    # the state is zero-padded to a multiple of the warpgroups, or to 16 in the "lanes" forward (4
    # lanes per channel, and a lane's 4 B values are one 16-byte load) (padded states stay 0, add nothing)
    lanes = "lanes" in (bwd_layout(opts, A.shape[1]), opts["fwd_layout"])
    multiple = 16 * wgs // math.gcd(16, wgs) if lanes else wgs
    key = "unroll" if training else "fwd_unroll"
    unroll = opts[key]
    if unroll is not True and not (isinstance(unroll, int) and unroll >= 1):
        raise ValueError(f"{key}: got {unroll!r}, expected a positive integer (rows unrolled per loop iteration) or True")
    parts = opts["sum_parts"]
    if not isinstance(parts, int) or parts < 1:
        raise ValueError(f"sum_parts: got {parts!r}, expected a positive integer (partial sums per row)")
    return Problem(x, dt, A, B, C, D, z, dt_bias, h0, resets, chunk, softplus, state_multiple=multiple, unroll=unroll,
                   bwd_unroll=opts["bwd_unroll"], red_rows=red_rows, red_multiple=RED_LAYOUTS[opts["red_layout"]],
                   sum_parts=parts)


def forward(platform, p: Problem, out_dtype, *, save_bounds=False, stages=None, interpret=False, opts=None):
    """(y (batch, time, chans), h_last (batch, chans, state), bounds or None)."""
    if platform == "tpu":
        from . import pallas_selective_scan_tpu as tpu

        outs = tpu.forward(p, out_dtype, save_bounds=save_bounds, interpret=interpret)
    else:
        opts = {**GPU_OPTIONS, **(opts or {})}
        if save_bounds and bwd_layout(opts, p.n_real) == "lanes":
            from .pallas_selective_scan_lanes import gpu_forward_lanes

            outs = gpu_forward_lanes(p, out_dtype, stages=stages or opts["stages"], interpret=bool(interpret), opts=opts,
                                     save_bounds=True)
        elif opts["fwd_layout"] == "lanes" and not save_bounds and opts["fwd_wgs"] == 1:
            from .pallas_selective_scan_lanes import gpu_forward_lanes

            outs = gpu_forward_lanes(p, out_dtype, stages=stages or opts["stages"],
                                     interpret=bool(interpret), opts=opts)
        elif opts["fwd_wgs"] > 1:
            from .pallas_selective_scan_wg import gpu_forward_wg

            outs = gpu_forward_wg(p, out_dtype, save_bounds=save_bounds, stages=stages or opts["stages"],
                                   interpret=interpret, opts=opts)
        else:
            mode = "mosaic" if interpret and opts["mosaic_interpret"] else interpret
            outs = _gpu_forward(p, out_dtype, save_bounds=save_bounds, stages=stages or opts["stages"],
                                interpret=mode, opts=opts)
    y, hl = outs[0], outs[1]
    y = y[:, : p.time, : p.chans]
    h_last = jnp.swapaxes(hl[:, : p.n_real, : p.chans], 1, 2)
    return y, h_last, (outs[2] if save_bounds else None)


def backward(platform, p: Problem, gy, gh_last, bounds, dtypes, *, stages=None, interpret=False, opts=None):
    """Gradients: dict with x, dt, z, B, C, A, D, dt_bias, h0 (unpadded). ``gh_last`` is
    the cotangent of the final state (batch, chans, state)."""
    gy = _pad_to(_pad_to(gy, 1, p.chunk), 2, LANES)
    ghl = _pad_to(_pad_to(jnp.swapaxes(gh_last.astype(jnp.float32), 1, 2), 1, p.n), 2, LANES)
    if platform == "tpu":
        from . import pallas_selective_scan_tpu as tpu

        outs = tpu.backward(p, gy, bounds, ghl, dtypes, interpret=interpret)
    else:
        opts = {**GPU_OPTIONS, **(opts or {})}
        if bwd_layout(opts, p.n_real) == "lanes":
            from .pallas_selective_scan_lanes_bwd import gpu_backward_lanes

            return gpu_backward_lanes(p, gy, bounds, ghl, dtypes, stages=stages or opts["bwd_stages"],
                                      interpret=bool(interpret), opts=opts)
        outs = _gpu_backward(p, gy, bounds, ghl, dtypes, stages=stages or opts["bwd_stages"], interpret=interpret, opts=opts)
    if p.gated:
        dx, ddt, dz, dbc, dA, dp, dh0 = outs
    else:
        (dx, ddt, dbc, dA, dp, dh0), dz = outs, None
    T, Cn, n = p.time, p.chans, p.n_real
    dbc = jnp.sum(dbc, axis=1)
    if platform != "tpu" and p.red_rows:  # (batch, time_p // red_rows, rows_pad) -> (batch, time_p, 2 state)
        dbc = dbc[..., : p.red_rows * 2 * p.n].reshape(p.batch, p.time_p, 2 * p.n)
    dbc = dbc[:, :T]
    return {
        "x": dx[:, :T, :Cn], "dt": ddt[:, :T, :Cn], "z": None if dz is None else dz[:, :T, :Cn],
        "B": dbc[..., :n], "C": dbc[..., p.n : p.n + n],
        "A": jnp.sum(dA, axis=0)[:n, :Cn].T, "D": jnp.sum(dp[:, 0, :Cn], axis=0), "dt_bias": jnp.sum(dp[:, 1, :Cn], axis=0),
        "h0": jnp.swapaxes(dh0[:, :n, :Cn], 1, 2),
    }
