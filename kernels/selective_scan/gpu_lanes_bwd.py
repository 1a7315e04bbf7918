"""The ``selective_scan`` GPU backward with each channel's states split over 4 lanes
(``SelectiveScanConfig.bwd_layout`` "lanes", or "auto", the default, for a state of at most
16): the layouts of :mod:`.gpu_lanes`, 32 channels per CTA, after a training forward that
saved its chunk-boundary states in the same layout. The formulas are those of
:mod:`.gpu_channels`' docstring.

Each chunk (walked from last to first) runs six passes, with a warpgroup barrier between them:

1. tile layout: ``delta = softplus(dt + dt_bias)`` and ``delta x`` to shared memory;
2. state layout, rows forward: the chunk's states recomputed from its boundary, each row's
   incoming state kept in shared memory, and the lanes' shares of ``C . h``
   (``lanes_bwd_group`` rows at a time in passes 2 and 4: their loads, then their arithmetic,
   then their stores, as in the forward);
3. tile layout: ``y' = C . h + D x``, ``dz``, the gated cotangent ``g_y'`` (to shared
   memory), ``dD`` accumulated;
4. state layout, rows backward: the adjoint ``g = g_h + C g_y'``; the lanes' shares of
   ``sum_n g_n B_n`` and of the decay term of ``d delta``; ``dA``; and each lane's products
   ``g delta x`` and ``h g_y'`` (the per-step terms of dB and dC) to a (chunk, 2, 32, state)
   buffer (B and C halves, each a contiguous (32, state) row per step, so these 16-byte
   stores are free of bank conflicts: in the first version, a (chunk, 32, 2, state) buffer,
   a quarter-warp's stores put two channels on the same 16 banks, and ncu counted 35% of the
   kernel's shared-store wavefronts as conflicts, with its shared-memory pipe 90% busy);
5. that buffer summed over the CTA's 32 channels: a lane holds one (channel parity, group,
   state) column of both halves, so 16 in-thread adds and one shuffle (``_sum_layout``); this
   is why the state must be at most 16 (2 x 4 x 4 columns on a warp's 32 lanes). The
   chunk's (chunk, 2 state) sums go to shared memory and one TMA reduce-add per chunk adds
   them into a single zero-initialised (batch, time, 2 state) buffer in HBM (issued after
   pass 6, waited on one chunk later). Mosaic GPU's interpreter has no reduce-add copy, so
   interpret mode writes each CTA's own rows instead, and XLA sums the CTAs (the same sums;
   on the GPU that was slower, 1.229 ms against 1.194, benchmarks/RESULTS.md);
6. tile layout: ``dx``, ``d dt`` (through the softplus), ``d dt_bias`` accumulated.

Checked by Mosaic GPU's interpreter and by the cuda lowering on the CPU
(tests/test_pallas_selective_scan.py, tests/test_gpu_lowering.py), and on the GPU by the
``gpu``-marked tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import LOG2E, Problem, SelectiveScanConfig, gpu_compiler_params, sigmoid, softplus
from .gpu_lanes import CHANS, QUAD, check, pallas_layout, pass_sync, setup, tiled
from .gpu_lanes import row_inputs as lanes_row_inputs


def _sum_layout(rows, ln):
    """(rows, 2, 32, 4, ln): B or C, channel, lane group, state: warp = row % 4, lane =
    (channel % 2, group, state) (2 x 4 x ln = 32 lanes: state 16), so that a warp's load reads
    32 consecutive words of the (rows, 2, 32, 4, ln) buffer (no bank conflict); the sum over
    the channels is 16 in-thread adds and one shuffle."""
    return tiled(((rows, 2, CHANS, QUAD, ln), (QUAD, 2, CHANS, QUAD, ln), (1, 1, 2, QUAD, ln), (1, 1, 1, 1, 1)),
                  (-15,), (-8, -7, -6), -1)


def backward(config: SelectiveScanConfig, p: Problem, gy, bounds, gh_last, dtypes, *, interpret):
    """Gradients (dict: x, dt, z, B, C, A, D, dt_bias, h0; unpadded) from the lanes forward's
    ``bounds`` (batch, chunks, chans_p, 4, state / 4). ``gy``: (batch, time_p, chans_p);
    ``gh_last``: the final state's cotangent, (batch, state, chans_p)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    check(p)
    batch, chunk, n = p.batch, p.chunk, p.n
    if n != 16:
        raise ValueError(f"bwd_layout='lanes': got a state of {p.n_real} ({n} padded), expected at most 16 "
                         "(the dB/dC sums put 2 x 16 values on a warp's 32 lanes); use bwd_layout='channels'")
    su = setup(p, config, "lanes_bwd_group")
    stages = config.bwd_stages
    reduce = not interpret  # the interpreter has no reduce-add copy: per-CTA rows there
    nc, nb = p.n_chunks, p.chans_p // CHANS
    ln, grp, sshape, bcw, padded = su.ln, su.grp, su.sshape, su.bcw, su.padded
    pS, pT, pT4, pROW, pSTATE, pPART, pTROW = (su.layouts[k] for k in ("S", "T", "T4", "ROW", "STATE", "PART", "TROW"))
    pR = pallas_layout(_sum_layout(chunk, ln))
    f32 = jnp.float32
    ghl = jnp.swapaxes(gh_last, 1, 2).reshape(batch, p.chans_p, QUAD, ln)
    seq_in = [p.x, su.dt] + ([p.z] if p.gated else []) + [gy]
    ins = seq_in + [su.bc, su.a2, p.params, bounds, ghl]
    k = len(seq_in)
    seq_shape = (batch, p.time_p, p.chans_p)
    shapes = [jax.ShapeDtypeStruct(seq_shape, dtypes["x"]), jax.ShapeDtypeStruct(seq_shape, dtypes["dt"])]
    if p.gated:
        shapes.append(jax.ShapeDtypeStruct(seq_shape, dtypes["z"]))
    dbc_shape = (batch, p.time_p, 2, QUAD, ln) if reduce else (batch, nb, p.time_p, 2, QUAD, ln)  # dB, dC
    if not reduce:
        shapes.append(jax.ShapeDtypeStruct(dbc_shape, f32))
    shapes += [jax.ShapeDtypeStruct((batch, p.chans_p, QUAD, ln), f32),  # dA
               jax.ShapeDtypeStruct((batch, 2, chunk, p.chans_p), f32),  # dD, dbias partials
               jax.ShapeDtypeStruct((batch, p.chans_p, QUAD, ln), f32)]  # dh0
    nseq = 2 + p.gated
    ln2 = 1.0 / LOG2E

    def bcast(v, dims, lay=pS, shape=sshape):
        return plgpu.layout_cast(lax.broadcast_in_dim(v, shape, dims), lay)

    def tile(ref):
        return plgpu.load(ref, layout=pT, optimized=False).astype(f32)

    def parts(ref):  # (chunk, 32, 4) lane shares -> (chunk, 32)
        return plgpu.layout_cast(jnp.sum(plgpu.load(ref, layout=pT4, optimized=False), axis=2), pT)

    n_in = len(ins) + reduce  # with "reduce": the (zeroed) dB/dC sum buffer is the last input ref

    def kernel(*refs):
        gin, gout = refs[:n_in], refs[n_in:n_in + len(shapes)]
        dl_s, dx_s, gy_s, hb_s, yp_s, dd_s, cs_s, *red = refs[n_in + len(shapes):]
        bi, ci = lax.axis_index("batch"), lax.axis_index("block")
        lanes = pl.ds(ci * CHANS, CHANS)
        a_ref, pr_ref, bnd_ref, ghl_ref = gin[k + 1], gin[k + 2], gin[k + 3].at[bi], gin[k + 4].at[bi]
        seq_out, (da_ref, dp_ref, dh0_ref) = gout[:nseq], gout[len(gout) - 3:]
        dbc_ref = gin[-1].at[bi] if reduce else gout[nseq].at[bi, ci]
        a2v = plgpu.load(a_ref.at[lanes], layout=pS, optimized=False)
        dvec = plgpu.load(pr_ref.at[0, lanes], layout=pTROW, optimized=False)
        bias = plgpu.load(pr_ref.at[1, lanes], layout=pTROW, optimized=False)
        bias_t = bcast(bias, (1,), pT, (chunk, CHANS))
        d_t = bcast(dvec, (1,), pT, (chunk, CHANS))
        gh0 = plgpu.load(ghl_ref.at[lanes], layout=pS, optimized=False)
        zero_s = plgpu.layout_cast(jnp.zeros(sshape, f32), pS)
        zero_t = plgpu.layout_cast(jnp.zeros((chunk, CHANS), f32), pT)
        seq = pl.BlockSpec((chunk, CHANS), lambda t: (nc - 1 - t, ci))
        bcs = pl.BlockSpec((chunk, bcw // ln, ln), lambda t: (nc - 1 - t, 0, 0))

        def row_inputs(bc_t, r):
            return lanes_row_inputs(p, bc_t, dl_s, dx_s, r, pROW, pSTATE)

        def decay_of(dl, off):
            arg = bcast(dl, (0,)) * a2v
            return jnp.exp2(arg if off is None else arg + off)

        def step(idx, *tiles_and_carry):
            *tiles, carry = tiles_and_carry
            gh, dA, dD, dbias = carry
            if p.gated:
                x_t, dt_t, z_t, gy_t, bc_t = tiles
            else:
                (x_t, dt_t, gy_t, bc_t), z_t = tiles, None
            c_idx = nc - 1 - idx[0]
            rows = pl.ds(c_idx * chunk, chunk)
            # 1. delta, delta x
            u = tile(dt_t) + bias_t
            delta = softplus(u) if p.softplus else u
            xv = tile(x_t)
            dl_s[...] = delta
            dx_s[...] = delta * xv
            pass_sync(interpret)

            # 2. the chunk's states from its boundary; each row's incoming state kept. grp rows at
            # a time: their loads, then their arithmetic, then their stores
            def fwd_group(gi, h):
                r0 = gi * grp
                ins_ = [row_inputs(bc_t, r0 + j) for j in range(grp)]
                outs_ = []
                for dl, dbx, bv, cv, off in ins_:
                    hin = h
                    h = decay_of(dl, off) * h + bcast(dbx, (0,)) * bcast(bv, (1, 2))
                    outs_.append((hin, plgpu.layout_cast(jnp.sum(bcast(cv, (1, 2)) * h, axis=2), pPART)))
                for j, (hin, part) in enumerate(outs_):
                    hb_s[r0 + j] = hin
                    yp_s[r0 + j] = part
                return h

            lax.fori_loop(0, chunk // grp, fwd_group, plgpu.load(bnd_ref.at[c_idx, lanes], layout=pS, optimized=False))
            pass_sync(interpret)
            # 3. y' = C . h + D x, dz, the gated cotangent, dD
            gyv = tile(gy_t)
            if z_t is not None:
                zv = tile(z_t)
                sg = sigmoid(zv)
                ypre = parts(yp_s) + d_t * xv
                seq_out[2].at[bi, rows, lanes][...] = (gyv * ypre * sg * (1.0 + zv * (1.0 - sg))).astype(seq_out[2].dtype)
                gyv = gyv * zv * sg
            gy_s[...] = gyv
            dD = dD + gyv * xv
            if reduce:  # the previous chunk's reduce-add has read its buffer (before the barrier that
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # lets pass 5 overwrite it)
            pass_sync(interpret)

            # 4. the adjoint, rows backward, grp rows at a time (loads, arithmetic, stores)
            def bwd_group(gi, carry):
                gh, dA = carry
                rs = [chunk - 1 - gi * grp - j for j in range(grp)]
                ins_ = [(row_inputs(bc_t, r), plgpu.load(gy_s.at[r], layout=pROW, optimized=False),
                         plgpu.load(hb_s.at[r], layout=pS, optimized=False)) for r in rs]
                outs_ = []
                for (dl, dbx, bv, cv, off), gyr, hprev in ins_:
                    gyp = bcast(gyr, (0,))
                    decay = decay_of(dl, off)
                    bb, dbxb = bcast(bv, (1, 2)), bcast(dbx, (0,))
                    hk = decay * hprev + dbxb * bb
                    g = gh + bcast(cv, (1, 2)) * gyp
                    carried = g * decay
                    dh = carried * hprev
                    outs_.append((g * dbxb, hk * gyp, plgpu.layout_cast(jnp.sum(g * bb, axis=2), pPART),
                                  plgpu.layout_cast(jnp.sum(dh * a2v, axis=2), pPART)))
                    gh, dA = carried, dA + dh * bcast(dl, (0,))
                for r, (pb, pc, sgb, dd) in zip(rs, outs_):
                    cs_s[r, 0] = pb
                    cs_s[r, 1] = pc
                    yp_s[r] = sgb
                    dd_s[r] = dd
                return gh, dA

            gh, dA = lax.fori_loop(0, chunk // grp, bwd_group, (gh, dA))
            pass_sync(interpret)
            # 5. dB, dC: the lanes' products summed over the CTA's channels
            sums = jnp.sum(plgpu.load(cs_s, layout=pR, optimized=False), axis=2)
            if reduce:
                red[0][...] = sums
            else:
                dbc_ref.at[rows][...] = sums
            # 6. dx, d dt, d dt_bias
            s_gb = parts(yp_s)
            ddelta = parts(dd_s) * ln2 + s_gb * xv
            du = ddelta * sigmoid(u) if p.softplus else ddelta
            seq_out[0].at[bi, rows, lanes][...] = (gyv * d_t + s_gb * delta).astype(seq_out[0].dtype)
            seq_out[1].at[bi, rows, lanes][...] = du.astype(seq_out[1].dtype)
            if reduce:  # the barrier, with the fence that makes the sums visible to the TMA unit
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(red[0], dbc_ref.at[rows], reduction_op="add")
            else:
                pass_sync(interpret)  # the next chunk's passes overwrite this one's buffers
            return gh, dA, dD, dbias + du

        gh, dA, dD, dbias = plgpu.emit_pipeline(
            step, grid=(nc,), in_specs=[seq] * len(seq_in) + [bcs], max_concurrent_steps=min(stages, nc),
            init_carry=(gh0, zero_s, zero_t, zero_t),
        )(*[g.at[bi] for g in gin[:k + 1]])
        if reduce:
            plgpu.wait_smem_to_gmem(0)
        da_ref.at[bi, lanes][...] = dA
        dh0_ref.at[bi, lanes][...] = gh
        dp_ref.at[bi, 0, :, lanes][...] = dD
        dp_ref.at[bi, 1, :, lanes][...] = dbias

    extra = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    scratch = [plgpu.SMEM((chunk, CHANS), f32) for _ in range(3)] + [
        plgpu.SMEM((chunk, CHANS, QUAD, ln), f32), plgpu.SMEM((chunk, CHANS, QUAD), f32),
        plgpu.SMEM((chunk, CHANS, QUAD), f32), plgpu.SMEM((chunk, 2, CHANS, QUAD, ln), f32)]
    call = plgpu.kernel(kernel, out_type=tuple(shapes), grid=(batch, nb), grid_names=("batch", "block"),
                        scratch_types=scratch + ([plgpu.SMEM((chunk, 2, QUAD, ln), f32)] if reduce else []),
                        compiler_params=gpu_compiler_params(config), **extra)
    if reduce:  # the sum buffer enters as a zeroed mutable ref that the kernel adds into
        acc = jax.new_ref(jnp.zeros(dbc_shape, f32))
        outs = list(call(*ins, acc))
        outs.insert(nseq, jax.ref.freeze(acc))
    else:
        outs = call(*ins)
    if p.gated:
        dx, ddt, dz, dbc, dA, dp, dh0 = outs
    else:
        (dx, ddt, dbc, dA, dp, dh0), dz = outs, None
    T_, Cn, nr = p.time, p.chans, p.n_real
    dbias = jnp.sum(dp[:, 1], axis=(0, 1))
    if padded and not p.softplus:  # d dt on the padding steps is not 0 without the softplus: take it out
        dbias = dbias - jnp.sum(ddt[:, T_:].astype(f32), axis=(0, 1))
    if not reduce:  # per-CTA rows: (batch, CTAs, time_p, 2, 4, ln)
        dbc = jnp.sum(dbc, axis=1)
    dbc = dbc.reshape(batch, p.time_p, 2 * n)[:, :T_]
    return {
        "x": dx[:, :T_, :Cn], "dt": ddt[:, :T_, :Cn], "z": None if dz is None else dz[:, :T_, :Cn],
        "B": dbc[..., :nr], "C": dbc[..., n:n + nr],
        "A": jnp.sum(dA, axis=0).reshape(p.chans_p, n)[:Cn, :nr],
        "D": jnp.sum(dp[:, 0], axis=(0, 1))[:Cn], "dt_bias": dbias[:Cn],
        "h0": dh0.reshape(batch, p.chans_p, n)[:, :Cn, :nr],
    }
