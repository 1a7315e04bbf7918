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
import copy
import dataclasses
import functools
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, copy_bandwidth, environment, save, table  # noqa: E402

from mnemax.kernels import linear_scan, selective_scan  # noqa: E402
from mnemax.kernels.linear_scan import LinearScanConfig  # noqa: E402
from mnemax.kernels.selective_scan import SelectiveScanConfig  # noqa: E402

RNG = np.random.default_rng(0)
SHAPE_FILTER: set[int] = set()
BACKEND_FILTER: set[str] = set()
# Calls per timed sample of the selective-scan rows and sweeps (``SS_BENCH_CALLS``; 3 until
# 2026-11-23). Enough back-to-back calls keep the GPU's queue full, so a sample holds the op's
# kernels (the Pallas kernel and the XLA ops around it) rather than the host's dispatch of the
# first call. With 3 calls the forward took 0.356 ms, against 0.292 ms for its kernel under ncu.
CALLS = int(os.environ.get("SS_BENCH_CALLS", "20"))


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
        first = len(rows)
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
        _speedups(rows[first:], times)
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


# ----------------------------------------------------------------------------- selective_scan


def naive_selective_scan(x, dt, A, B, C, D, z, dt_bias, block: int = 32):
    """The baseline: one Triton program per (batch, channel block), one step per iteration,
    state in registers (softplus, D skip and SiLU gate fused)."""
    from jax.experimental import pallas as pl

    batch, time, chans = x.shape
    n = A.shape[1]

    def kernel(x_ref, dt_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, y_ref):
        a = a_ref[...].astype(jnp.float32)  # (block, n)
        dvec, bias = d_ref[...].astype(jnp.float32), bias_ref[...].astype(jnp.float32)

        def body(t, h):
            u = dt_ref[t, :].astype(jnp.float32) + bias
            delta = jnp.where(u > 20.0, u, jnp.log1p(jnp.exp(jnp.minimum(u, 20.0))))
            xv = x_ref[t, :].astype(jnp.float32)
            bv, cv = b_ref[t, :].astype(jnp.float32), c_ref[t, :].astype(jnp.float32)
            h = jnp.exp(delta[:, None] * a) * h + (delta * xv)[:, None] * bv[None, :]
            y = jnp.sum(h * cv[None, :], axis=1) + dvec * xv
            zv = z_ref[t, :].astype(jnp.float32)
            y_ref[t, :] = (y * zv * jax.nn.sigmoid(zv)).astype(y_ref.dtype)
            return h

        jax.lax.fori_loop(0, time, body, jnp.zeros((block, n), jnp.float32))

    seq = pl.BlockSpec((None, time, block), lambda i, j: (i, 0, j))
    bc = pl.BlockSpec((None, time, n), lambda i, j: (i, 0, 0))
    return pl.pallas_call(
        kernel, grid=(batch, chans // block),
        in_specs=[seq, seq, seq, bc, bc, pl.BlockSpec((block, n), lambda i, j: (j, 0)),
                  pl.BlockSpec((block,), lambda i, j: (j,)), pl.BlockSpec((block,), lambda i, j: (j,))],
        out_specs=seq, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    )(x, dt, z, B, C, A, D, dt_bias)


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _ss_grads(backend, gy, config=None):
    """Jitted: (x, dt, A, B, C, D, z, dt_bias) -> their gradients under the cotangent ``gy``
    (``pallas_gpu+time_split``: the Pallas backend with ``time_split="auto"``; ``config``:
    the kernels' SelectiveScanConfig)."""
    name, config = _ss_backend(backend, config)

    def f(*a):
        _, vjp = jax.vjp(lambda *q: selective_scan(q[0], q[1], q[2], q[3], q[4], D=q[5], z=q[6], dt_bias=q[7],
                                                   dt_softplus=True, backend=name, config=config), *a)
        return vjp(gy)
    return jax.jit(f)


def _ss_backend(backend, config=None):
    """(the op's backend name, its SelectiveScanConfig) for a benchmark backend
    (``pallas_gpu+time_split``: the Pallas backend with ``time_split="auto"``)."""
    config = config or SelectiveScanConfig()
    if backend.endswith("+time_split"):
        config = dataclasses.replace(config, time_split="auto")
    return backend.removesuffix("+time_split"), config


def selective_scan_rows(bw: float, quick: bool) -> list[dict]:
    rows = []
    shapes = [((8, 2048, 1536, 16), jnp.float32), ((8, 2048, 1536, 16), jnp.bfloat16), ((8, 2048, 4096, 16), jnp.bfloat16),
              ((1, 65536, 1536, 16), jnp.bfloat16)]
    if quick:
        shapes = [((2, 256, 256, 16), jnp.float32)] + shapes[:1]
    elif SHAPE_FILTER:
        shapes = [s for i, s in enumerate(shapes) if i in SHAPE_FILTER]
    for (b, t, c, n), dtype in shapes:
        first = len(rows)
        item = jnp.dtype(dtype).itemsize
        x = jnp.asarray(RNG.standard_normal((b, t, c), np.float32), dtype)
        dt = jnp.asarray(RNG.standard_normal((b, t, c), np.float32) * 0.5 - 2.0, dtype)
        z = jnp.asarray(RNG.standard_normal((b, t, c), np.float32), dtype)
        A = -jnp.asarray(np.tile(np.arange(1, n + 1, dtype=np.float32), (c, 1)))
        Bm = jnp.asarray(RNG.standard_normal((b, t, n), np.float32), dtype)
        Cm = jnp.asarray(RNG.standard_normal((b, t, n), np.float32), dtype)
        D = jnp.ones((c,), jnp.float32)
        bias = jnp.asarray(RNG.uniform(-4, -2, (c,)).astype(np.float32))
        gy = jnp.asarray(RNG.standard_normal((b, t, c), np.float32), dtype)
        args = (x, dt, A, Bm, Cm, D, z, bias)
        big, small = b * t * c * item, b * t * n * item
        fwd_bytes = 4 * big + 2 * small
        bwd_bytes = fwd_bytes + 7 * big + 4 * small

        def run(backend):
            name, config = _ss_backend(backend)

            def f(x, dt, A, Bm, Cm, D, z, bias):
                return selective_scan(x, dt, A, Bm, Cm, D=D, z=z, dt_bias=bias, dt_softplus=True, backend=name, config=config)

            return jax.jit(f)

        _log(f"selective_scan {(b, t, c, n)} {jnp.dtype(dtype).name}: xla reference output")
        ref = run("xla")(*args).astype(jnp.float32)
        times = {}
        for name in ("pallas_gpu", "xla") + (("pallas_gpu+time_split",) if b == 1 else ()):
            if BACKEND_FILTER and name not in BACKEND_FILTER:
                continue
            try:
                f = run(name)  # timed through jit's dispatch (a Compiled object's Python call adds ~0.2 ms)
                t0 = time.time()
                jax.block_until_ready(f(*args))
                _log(f"  {name} forward compiled and ran in {time.time() - t0:.1f}s")
                err = rel_err(f(*args).astype(jnp.float32), ref)
                tf = bench(f, *args, calls=CALLS, repeats=5)
                _log(f"  {name} forward {tf * 1e3:.3f} ms, rel err {err:.2e}")
                tb = None
                try:
                    fb = _ss_grads(name, gy)
                    t0 = time.time()
                    compiled = fb.lower(*args).compile()  # for the memory stats
                    _log(f"  {name} fwd+bwd compiled in {time.time() - t0:.1f}s")
                    tb = bench(fb, *args, calls=max(2, CALLS // 2), repeats=3)
                    _log(f"  {name} fwd+bwd {tb * 1e3:.3f} ms")
                    mem = compiled.memory_analysis()
                    temp = getattr(mem, "temp_size_in_bytes", None)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    temp = f"bwd error: {type(e).__name__}: {str(e)[:120]}"
                times[name] = (tf, tb)
                row = _row("selective_scan", (b, t, c, n), dtype, name, tf, tb, fwd_bytes, bwd_bytes, bw, err)
                row["bwd_temp_MB"] = temp / 1e6 if isinstance(temp, int | float) else temp
                row["BTCN_MB"] = b * t * c * n * 4 / 1e6
                rows.append(row)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"op": "selective_scan", "shape": str((b, t, c, n)), "dtype": jnp.dtype(dtype).name, "backend": name,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})
        if t <= 4096 and dtype == jnp.float32 and (not BACKEND_FILTER or "naive" in BACKEND_FILTER):
            try:
                nv = jax.jit(naive_selective_scan)
                err = rel_err(nv(*args).astype(jnp.float32), ref)
                tn = bench(nv, *args, calls=2, repeats=3)
                times["naive"] = (tn, None)
                rows.append(_row("selective_scan", (b, t, c, n), dtype, "naive", tn, None, fwd_bytes, bwd_bytes, bw, err))
            except Exception as e:  # noqa: BLE001
                rows.append({"op": "selective_scan", "shape": str((b, t, c, n)), "backend": "naive", "error": f"{type(e).__name__}: {str(e)[:200]}"})
        if (b, t, c) == (8, 2048, 1536) and dtype == jnp.float32 and (not BACKEND_FILTER or "reference" in BACKEND_FILTER):
            try:
                rf = run("reference")
                tr = bench(rf, *args, calls=1, repeats=3)
                rows.append(_row("selective_scan", (b, t, c, n), dtype, "reference(lax.scan)", tr, None, fwd_bytes, bwd_bytes, bw, 0.0))
            except Exception as e:  # noqa: BLE001
                rows.append({"op": "selective_scan", "backend": "reference", "error": str(e)[:200]})
        _speedups(rows[first:], times)
    return rows


def _variants(spec: str) -> list[dict]:
    """'k=v+k=v,k=v' -> [{k: v, k: v}, {k: v}] (integer values as int; fields of SelectiveScanConfig)."""
    return [{k: (int(v) if v.isdigit() else v) for k, _, v in (kv.partition("=") for kv in c.split("+"))}
            for c in spec.split(",")]


def selective_scan_sweep(bw: float, quick: bool) -> list[dict]:
    """Forward variants of the GPU selective-scan kernel at (8, 2048, 1536, 16): the built-in
    list, or ``SS_FWD_VARIANTS`` ('k=v+k=v,...', SelectiveScanConfig fields); sequences in
    ``SS_SWEEP_DTYPE`` (float32). The forward-only kernel at the config's training ``chunk``."""
    from mnemax.kernels.selective_scan import gpu

    b, t, c, n = (2, 256, 256, 16) if quick else (8, 2048, 1536, 16)
    x = jnp.asarray(RNG.standard_normal((b, t, c), np.float32))
    dt = jnp.asarray(RNG.standard_normal((b, t, c), np.float32) * 0.5 - 2.0)
    z = jnp.asarray(RNG.standard_normal((b, t, c), np.float32))
    A = -jnp.asarray(np.tile(np.arange(1, n + 1, dtype=np.float32), (c, 1)))
    Bm = jnp.asarray(RNG.standard_normal((b, t, n), np.float32))
    Cm = jnp.asarray(RNG.standard_normal((b, t, n), np.float32))
    D = jnp.ones((c,), jnp.float32)
    bias = jnp.asarray(RNG.uniform(-4, -2, (c,)).astype(np.float32))
    dtype = jnp.dtype(os.environ.get("SS_SWEEP_DTYPE", "float32"))  # the sequences' dtype
    x, dt, z, Bm, Cm = (v.astype(dtype) for v in (x, dt, z, Bm, Cm))
    ref = jax.jit(lambda *a: selective_scan(*a[:5], D=a[5], z=a[6], dt_bias=a[7], dt_softplus=True, backend="xla"))(
        x, dt, A, Bm, Cm, D, z, bias).astype(jnp.float32)
    fwd_bytes = (4 * b * t * c + 2 * b * t * n) * dtype.itemsize
    rows = []
    variants = [{"unroll": 1}, {"unroll": 2}, {"unroll": 4}, {"unroll": 2, "approx_math": False},
                {"unroll": 2, "no_auto_barriers": False}, {"unroll": 2, "chunk": 16}, {"unroll": 2, "stages": 3}]
    if os.environ.get("SS_FWD_VARIANTS"):  # e.g. 'chunk=16+lanes_group=4,stages=2'
        variants = _variants(os.environ["SS_FWD_VARIANTS"])
    for opts in variants:
        name = "pallas " + ",".join(f"{k}={v}" for k, v in opts.items())
        try:
            config = SelectiveScanConfig(**opts)

            def f(x, dt, A, Bm, Cm, D, z, bias, config=config):
                p = gpu.make_problem(config, x, dt, A, Bm, Cm, D, z, bias, None, None, True)
                return gpu.forward(config, p, x.dtype)[0]

            f = jax.jit(f)
            t0 = time.time()
            f.lower(x, dt, A, Bm, Cm, D, z, bias).compile()
            comp = time.time() - t0
            err = rel_err(f(x, dt, A, Bm, Cm, D, z, bias).astype(jnp.float32), ref)
            tf = bench(f, x, dt, A, Bm, Cm, D, z, bias, calls=CALLS, repeats=5)
            _log(f"  sweep {name}: {tf * 1e3:.3f} ms (compile {comp:.0f}s, err {err:.1e})")
            row = _row("selective_scan sweep", (b, t, c, n), dtype, name, tf, None, fwd_bytes, fwd_bytes, bw, err)
            row["compile_s"] = comp
            if os.environ.get("SS_SWEEP_KERNEL_ONLY"):
                # the kernel alone: the packed inputs (bc tile, A^T, D/bias rows, h0) built
                # once outside the timed function, so the XLA ops around the kernel drop out
                p0 = gpu.make_problem(config, x, dt, A, Bm, Cm, D, z, bias, None, None, True)
                names_ = ("x", "dt", "z", "bc", "a2", "params", "h0")

                def g(*arrs, p0=p0, config=config):
                    q = copy.copy(p0)
                    for k_, v_ in zip(names_, arrs):
                        setattr(q, k_, v_)
                    return gpu.forward(config, q, x.dtype)[0]

                packed = [getattr(p0, k_) for k_ in names_]
                tk = bench(jax.jit(g), *packed, calls=CALLS, repeats=5)
                row["kernel_ms"], row["kernel_x_floor"] = tk * 1e3, tk / (fwd_bytes / bw)
                _log(f"  sweep {name}: kernel alone {tk * 1e3:.3f} ms ({tk / (fwd_bytes / bw):.2f}x floor)")
            rows.append(row)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"op": "selective_scan sweep", "backend": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


def selective_scan_bwd_sweep(bw: float, quick: bool) -> list[dict]:
    """Training variants of the GPU selective-scan kernels at (8, 2048, 1536, 16) float32: the
    built-in list or ``SS_BWD_VARIANTS`` ('k=v+k=v,...', SelectiveScanConfig fields).
    Forward+backward time and the largest relative error of any gradient against the xla
    backend's."""
    b, t, c, n = (2, 256, 256, 16) if quick else (8, 2048, 1536, 16)
    f32 = np.float32
    x = jnp.asarray(RNG.standard_normal((b, t, c), f32))
    dt = jnp.asarray(RNG.standard_normal((b, t, c), f32) * 0.5 - 2.0)
    z = jnp.asarray(RNG.standard_normal((b, t, c), f32))
    A = -jnp.asarray(np.tile(np.arange(1, n + 1, dtype=f32), (c, 1)))
    Bm, Cm = jnp.asarray(RNG.standard_normal((b, t, n), f32)), jnp.asarray(RNG.standard_normal((b, t, n), f32))
    D = jnp.ones((c,), jnp.float32)
    bias = jnp.asarray(RNG.uniform(-4, -2, (c,)).astype(f32))
    gy = jnp.asarray(RNG.standard_normal((b, t, c), f32))
    args = (x, dt, A, Bm, Cm, D, z, bias)

    ref = _ss_grads("xla", gy)(*args)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    big, small = b * t * c * 4, b * t * n * 4
    fb_bytes = 11 * big + 6 * small
    rows = []
    variants = [{}, {"lanes_bwd_group": 2}, {"bwd_layout": "channels"}, {"bwd_layout": "channels", "red_rows": 2}]
    if os.environ.get("SS_BWD_VARIANTS"):  # e.g. 'bwd_layout=channels+red_rows=2,lanes_bwd_group=2'
        variants = _variants(os.environ["SS_BWD_VARIANTS"])
    for opts in variants:
        name = "pallas " + (",".join(f"{k}={v}" for k, v in opts.items()) or "defaults")
        try:
            f = _ss_grads("pallas_gpu", gy, SelectiveScanConfig(**opts))
            t0 = time.time()
            out = jax.block_until_ready(f(*args))
            comp = time.time() - t0  # compile and one call
            errs = {k: rel_err(o, r) for k, o, r in zip(names, out, ref)}
            tb = bench(f, *args, calls=max(2, CALLS // 2), repeats=5)
            worst = max(errs, key=errs.get)
            _log(f"  bwd sweep {name}: {tb * 1e3:.3f} ms (compile {comp:.0f}s, worst grad err {errs[worst]:.1e} in {worst})")
            row = {"op": "selective_scan bwd sweep", "shape": str((b, t, c, n)), "dtype": "float32", "backend": name,
                   "fwdbwd_ms": tb * 1e3, "fwdbwd_x_floor": tb / (fb_bytes / bw), "floor_ms": fb_bytes / bw * 1e3,
                   "rel_err": errs[worst], "compile_s": comp, "grad_errs": errs}
            rows.append(row)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"op": "selective_scan bwd sweep", "backend": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


def linear_scan_sweep(bw: float, quick: bool) -> list[dict]:
    """bf16 (8, 4096, 4096) forward: chunk, pipeline depth and packing variants (LinearScanConfig)."""
    from mnemax.kernels.linear_scan import gpu as linear_gpu

    shape = (8, 4096, 4096)
    n = int(np.prod(shape))
    a = jnp.asarray(RNG.uniform(0.9, 1.0, shape).astype(np.float32), jnp.bfloat16)
    b = jnp.asarray(RNG.standard_normal(shape, np.float32), jnp.bfloat16)
    h0 = jnp.zeros((8, 4096), jnp.float32)
    ref = jax.jit(functools.partial(linear_scan, backend="xla"))(a, b)
    rows = []
    for packed, chunk, stages in [(True, 32, 2), (True, 64, 2), (True, 32, 3), (True, 16, 4), (False, 32, 2), (False, 64, 2)]:
        name = f"pallas packed={packed} chunk={chunk} stages={stages}"
        try:
            config = LinearScanConfig(chunk=chunk, stages=stages, pack_bf16=packed)
            f = jax.jit(lambda a, b, h0, config=config: linear_gpu.forward(config, a, b, h0)[0])
            err = rel_err(f(a, b, h0).astype(jnp.float32), ref.astype(jnp.float32))
            t = bench(f, a, b, h0)
            rows.append(_row("linear_scan sweep", shape, jnp.bfloat16, name, t, None, 3 * n * 2, 8 * n * 2, bw, err))
        except Exception as e:  # noqa: BLE001
            rows.append({"op": "linear_scan sweep", "backend": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


# ----------------------------------------------------------------------------- main


SECTIONS = {"linear_scan": linear_scan_rows, "linear_scan_sweep": linear_scan_sweep, "selective_scan": selective_scan_rows,
            "selective_scan_sweep": selective_scan_sweep, "selective_scan_bwd_sweep": selective_scan_bwd_sweep}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ops", default=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", default="", help="selective_scan: comma-separated indices of the shapes to run")
    p.add_argument("--backends", default="", help="selective_scan: comma-separated backends to run (default: all)")
    args = p.parse_args()
    env = environment()
    print(env, flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    global SHAPE_FILTER
    SHAPE_FILTER = {int(i) for i in args.shapes.split(",") if i}
    BACKEND_FILTER.update(b for b in args.backends.split(",") if b)
    for op in args.ops.split(","):
        rows += SECTIONS[op](bw, args.quick)
        print(table(rows, COLUMNS), flush=True)
    save({"env": env, "copy_bandwidth": bw, "rows": rows}, "kernels.json")
    print("\n" + table(rows, COLUMNS))


COLUMNS = ["op", "shape", "dtype", "backend", "rel_err", "fwd_ms", "fwd_GBps", "fwd_x_floor", "fwdbwd_ms", "fwdbwd_x_floor",
           "floor_ms", "vs_xla", "vs_naive", "bwd_temp_MB", "BTCN_MB", "compile_s", "error"]

if __name__ == "__main__":
    main()
