"""Kernel benchmarks on the accelerator: correctness on the real lowering, then timings.

    python benchmarks/kernels.py [--ops linear_scan,selective_scan,...] [--quick]

For every op, shape and backend it prints the median time, the bytes the op must
move at least (each input read once, each output written once), the achieved GB/s,
the ratio to the HBM floor (minimal bytes / copy bandwidth measured in this run), and
the speedup over the ``xla`` backend and over a naive Pallas kernel (one program per
channel block that loads one time step per iteration). Forward and forward+backward.
A JSON file with every figure goes to $OUT (or the current directory).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, copy_bandwidth, environment, save, table  # noqa: E402

from mnemax.kernels import linear_scan  # noqa: E402

RNG = np.random.default_rng(0)


def rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


# ----------------------------------------------------------------------------- naive kernel


def naive_linear_scan(a, b, block: int = 32):
    """The baseline: one Triton program per (batch, channel block), one row per step."""
    from jax.experimental import pallas as pl

    batch, time, chans = b.shape

    def kernel(a_ref, b_ref, o_ref):
        def body(t, h):
            h = a_ref[t, :].astype(jnp.float32) * h + b_ref[t, :].astype(jnp.float32)
            o_ref[t, :] = h.astype(o_ref.dtype)
            return h

        jax.lax.fori_loop(0, time, body, jnp.zeros((block,), jnp.float32))

    spec = pl.BlockSpec((None, time, block), lambda i, j: (i, 0, j))
    return pl.pallas_call(
        kernel, grid=(batch, chans // block), in_specs=[spec, spec], out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(b.shape, b.dtype),
    )(a, b)


# ----------------------------------------------------------------------------- linear_scan


def linear_scan_rows(bw: float, quick: bool) -> list[dict]:
    rows = []
    shapes = [((8, 4096, 4096), jnp.bfloat16), ((8, 4096, 4096), jnp.float32), ((1, 65536, 1536), jnp.bfloat16)]
    if quick:
        shapes = shapes[:1]
    for shape, dtype in shapes:
        n = int(np.prod(shape))
        item = jnp.dtype(dtype).itemsize
        a = jnp.asarray(RNG.uniform(0.9, 1.0, shape).astype(np.float32), dtype)
        b = jnp.asarray(RNG.standard_normal(shape, np.float32), dtype)
        g = jnp.asarray(RNG.standard_normal(shape, np.float32), dtype)
        ref = jax.jit(functools.partial(linear_scan, backend="xla"))(a, b)
        fwd_bytes, bwd_bytes = 3 * n * item, (3 + 5) * n * item

        def fwd(backend):
            return jax.jit(functools.partial(linear_scan, backend=backend))

        def fwd_bwd(backend):
            def f(a, b, g):
                h, vjp = jax.vjp(functools.partial(linear_scan, backend=backend), a, b)
                return vjp(g)

            return jax.jit(f)

        cands = {"xla": ("xla",), "pallas_gpu": ("pallas_gpu",)}
        times = {}
        for name, (backend,) in cands.items():
            try:
                out = fwd(backend)(a, b)
                err = rel_err(out.astype(jnp.float32), ref.astype(jnp.float32))
                t = bench(fwd(backend), a, b)
                tb = bench(fwd_bwd(backend), a, b, g, calls=3, repeats=5)
                times[name] = (t, tb)
                rows.append(_row("linear_scan", shape, dtype, name, t, tb, fwd_bytes, bwd_bytes, bw, err))
            except Exception as e:  # noqa: BLE001 - report and go on
                traceback.print_exc()
                rows.append({"op": "linear_scan", "shape": str(shape), "dtype": jnp.dtype(dtype).name, "backend": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        if shape[2] % 32 == 0:
            try:
                naive = jax.jit(naive_linear_scan)
                out = naive(a, b)
                err = rel_err(out.astype(jnp.float32), ref.astype(jnp.float32))
                t = bench(naive, a, b, calls=3, repeats=5)
                times["naive"] = (t, None)
                rows.append(_row("linear_scan", shape, dtype, "naive", t, None, fwd_bytes, bwd_bytes, bw, err))
            except Exception as e:  # noqa: BLE001
                rows.append({"op": "linear_scan", "shape": str(shape), "backend": "naive", "error": f"{type(e).__name__}: {str(e)[:200]}"})
        _speedups(rows, times)
    return rows


def _row(op, shape, dtype, backend, t, tb, fbytes, bbytes, bw, err):
    floor, floor_b = fbytes / bw, bbytes / bw
    return {
        "op": op, "shape": str(shape), "dtype": jnp.dtype(dtype).name, "backend": backend,
        "fwd_ms": t * 1e3, "fwd_GBps": fbytes / t / 1e9, "fwd_x_floor": t / floor,
        "fwdbwd_ms": None if tb is None else tb * 1e3, "fwdbwd_x_floor": None if tb is None else tb / floor_b,
        "floor_ms": floor * 1e3, "rel_err": err,
    }


def _speedups(rows, times):
    for r in rows:
        if r.get("backend") not in times or "fwd_ms" not in r:
            continue
        if "xla" in times:
            r["vs_xla"] = times["xla"][0] / times[r["backend"]][0]
        if "naive" in times:
            r["vs_naive"] = times["naive"][0] / times[r["backend"]][0]


# ----------------------------------------------------------------------------- main


SECTIONS = {"linear_scan": linear_scan_rows}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ops", default=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    env = environment()
    print(env, flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    for op in args.ops.split(","):
        rows += SECTIONS[op](bw, args.quick)
        print(table(rows, COLUMNS), flush=True)
    save({"env": env, "copy_bandwidth": bw, "rows": rows}, "kernels.json")
    print("\n" + table(rows, COLUMNS))


COLUMNS = ["op", "shape", "dtype", "backend", "rel_err", "fwd_ms", "fwd_GBps", "fwd_x_floor", "fwdbwd_ms", "fwdbwd_x_floor", "floor_ms", "vs_xla", "vs_naive", "error"]

if __name__ == "__main__":
    main()
