"""The selective-scan GPU forward with the states split over warpgroups (``GPU_OPTIONS["fwd_wgs"]``
> 1; see :mod:`mnemax.kernels.pallas_selective_scan` for the problem layout and the 1-warpgroup
kernels). On an H100 it was correct but not faster than one warpgroup (benchmarks/RESULTS.md)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .pallas_selective_scan import _gpu_params
from .pallas_selective_scan_rows import LANES, Problem, _sigmoid, _softplus


def _fwd_rows_part(p: Problem, x_t, dt_t, bc_t, a2, bias, h, states, ypart_t):
    """The forward recurrence over one chunk's rows for the state rows ``states`` only
    (``h``, ``a2``: their lane vectors); each row's partial ``sum_states C h`` goes to
    ``ypart_t[r]`` (the D skip and the gate are applied once the partials are summed)."""
    n = p.n

    def row(r, h):
        u = dt_t[r].astype(jnp.float32) + bias
        delta = (_softplus(u) if p.softplus else u) * bc_t[r, 2 * n + 1]
        dbx = delta * x_t[r].astype(jnp.float32)
        off = bc_t[r, 2 * n + 2]  # the reset as an exponent offset (Problem.bc)
        new, y = [], None
        for j, i in enumerate(states):
            hi = jnp.exp2(delta * a2[j] + off) * h[j] + dbx * bc_t[r, i]
            y = bc_t[r, n + i] * hi if y is None else y + bc_t[r, n + i] * hi
            new.append(hi)
        ypart_t[r] = y
        return tuple(new)

    return lax.fori_loop(0, p.chunk, row, h, unroll=p.unroll)


def gpu_forward_wg(p: Problem, out_dtype, *, save_bounds: bool, stages: int, interpret: bool, opts):
    """The forward with the states split over ``opts["fwd_wgs"]`` compute warpgroups.

    Warpgroups 0..S-1 each carry ``state / S`` state rows of the CTA's 128 channels; warpgroup
    S issues the TMA loads of the chunk tiles (x, dt, (z), bc) ``stages`` chunks ahead, each
    slot reused once every compute warpgroup has arrived on its ``consumed`` barrier. Every
    chunk, each compute warpgroup writes its partial ``C . h`` rows to a shared (2, S, chunk,
    128) buffer (double-buffered by chunk parity), all meet on ``ysync``, and warpgroup w then
    finishes rows ``w, w + S, ...``: the sum of the partials, the D skip and the gate, stored
    straight to HBM. Chunk-start states (``bounds``) and the final state are stored by the
    warpgroup that owns each state row. ``interpret``: Mosaic GPU's interpreter (threads,
    barriers and TMA simulated on the CPU)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    S = opts["fwd_wgs"]
    batch, chunk, n, nc, nb = p.batch, p.chunk, p.n, p.n_chunks, p.n_blocks
    if n % S or chunk % S:  # make_problem pads the state and checks the chunk
        raise ValueError(f"fwd_wgs: got {S}, expected a divisor of the (padded) state size ({n}) and of the chunk ({chunk})")
    nw, stages, f32 = n // S, min(stages, nc), jnp.float32
    shapes = [jax.ShapeDtypeStruct((batch, p.time_p, p.chans_p), out_dtype),
              jax.ShapeDtypeStruct((batch, n, p.chans_p), f32)]
    if save_bounds:
        shapes.append(jax.ShapeDtypeStruct((batch, nc, n, p.chans_p), f32))
    seq_ins = [p.x, p.dt] + ([p.z] if p.gated else [])
    ins = seq_ins + [p.bc, p.a2, p.params, p.h0]
    k = len(seq_ins)

    def kernel(*refs):
        gin, gout = refs[: len(ins)], refs[len(ins):]
        seq_refs, bc_ref, a_ref, pr_ref, h0_ref = gin[:k], gin[k], gin[k + 1], gin[k + 2], gin[k + 3]
        y_ref, hl_ref = gout[0], gout[1]
        bnd_ref = gout[2] if save_bounds else None
        bi, ci, wg = lax.axis_index("batch"), lax.axis_index("block"), lax.axis_index("wg")
        lanes = pl.ds(ci * LANES, LANES)

        def scoped(tiles, bars, consumed, ysync, ypart):
            def issue(t, slot):
                rows = pl.ds(t * chunk, chunk)
                for g, buf, bar in zip(seq_refs, tiles[:k], bars[:k]):
                    plgpu.copy_gmem_to_smem(g.at[bi, rows, lanes], buf.at[slot], bar.at[slot])
                plgpu.copy_gmem_to_smem(bc_ref.at[bi, rows], tiles[k].at[slot], bars[k].at[slot])

            @pl.when(wg == S)
            def _memory():
                for t in range(stages):
                    issue(t, t)

                if nc > stages:
                    @pl.loop(stages, nc)
                    def _(t):
                        slot = lax.rem(t, stages)
                        plgpu.barrier_wait(consumed.at[slot])
                        issue(t, slot)

                for t in range(nc - stages, nc):  # the last chunks' releases: every phase observed
                    plgpu.barrier_wait(consumed.at[t % stages])

            def compute(w):
                mine = range(w * nw, (w + 1) * nw)
                a2 = [a_ref[i, lanes] for i in mine]
                dvec, bias = pr_ref[0, lanes], pr_ref[1, lanes]
                h0 = tuple(h0_ref[bi, i, lanes] for i in mine)

                def chunk_step(t, h):
                    slot = lax.rem(t, stages)
                    for bar in bars:
                        plgpu.barrier_wait(bar.at[slot])
                    x_t, dt_t = tiles[0].at[slot], tiles[1].at[slot]
                    bc_t = tiles[k].at[slot]
                    if save_bounds:
                        for j, i in enumerate(mine):
                            bnd_ref[bi, t, i, lanes] = h[j]
                    par = lax.rem(t, 2)
                    h = _fwd_rows_part(p, x_t, dt_t, bc_t, a2, bias, h, mine, ypart.at[par, w])
                    plgpu.barrier_arrive(ysync)
                    plgpu.barrier_wait(ysync)
                    for r in range(w, chunk, S):  # this warpgroup's share of the rows' epilogue
                        y = ypart[par, 0, r]
                        for v in range(1, S):
                            y = y + ypart[par, v, r]
                        xv = x_t[r].astype(f32)
                        y = y + dvec * xv
                        if p.gated:
                            zv = tiles[2].at[slot][r].astype(f32)
                            y = y * zv * _sigmoid(zv)
                        y_ref[bi, t * chunk + r, lanes] = y.astype(out_dtype)
                    plgpu.barrier_arrive(consumed.at[slot])
                    return h

                h = lax.fori_loop(0, nc, chunk_step, h0)
                for j, i in enumerate(mine):
                    hl_ref[bi, i, lanes] = h[j]

            for w in range(S):
                pl.when(wg == w)(functools.partial(compute, w))

        pl.run_scoped(
            scoped,
            [plgpu.SMEM((stages, chunk, LANES), v.dtype) for v in seq_ins] + [plgpu.SMEM((stages, chunk, p.bc_width), f32)],
            [plgpu.Barrier(num_barriers=stages) for _ in range(k + 1)],
            plgpu.Barrier(num_arrivals=S, num_barriers=stages),
            plgpu.Barrier(num_arrivals=S),
            plgpu.SMEM((2, S, chunk, LANES), f32),
            collective_axes="wg",
        )

    extra = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    return plgpu.kernel(kernel, out_type=tuple(shapes), grid=(batch, nb), grid_names=("batch", "block"),
                        num_threads=S + 1, thread_name="wg", compiler_params=_gpu_params(opts), **extra)(*ins)
