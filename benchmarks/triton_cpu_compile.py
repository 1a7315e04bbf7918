"""Compile the matrix-state ops' Pallas GPU (Triton) kernels for Hopper on a machine without
a GPU: compile seconds and shared memory of every kernel, before spending device time.

JAX lowers each ``pallas_call`` to Triton IR on any machine (``tests/test_gpu_lowering.py``
checks that); XLA compiles that IR to PTX only on the GPU, and that is where a kernel can fail
for want of shared memory or take minutes (an unrolled loop). This script captures the Triton
IR of every kernel in an op's forward and gradient, with the warps and pipeline stages
``pallas_call`` gives it, and compiles it with the ``triton`` package (3.9, sm_90) in a second
Python, printing a table: kernel, dtype, warps, stages, compile seconds, shared memory bytes
(Hopper allows 232,448 per block), registers per thread and spilled bytes (``ptxas -v``). The Triton in XLA differs in version from the pip one, so
the figures are estimates; a kernel over the limit here is worth fixing before a GPU run.

    python benchmarks/triton_cpu_compile.py --triton_python /path/to/venv/bin/python \\
        [--ops gla,gla_channel,deltanet,gdn,kda] [--dtypes bfloat16,float32] [--d 128] [--d_v 64] [--chunk 64] \\
        [--heads 8 --qk_heads 1] [--config num_warps=8]

The second Python needs ``pip install triton==3.9.0`` (a CPU machine is enough: the
compiler and ``ptxas`` ship in the wheel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from linear_attention import parse_config  # noqa: E402

SHARED_LIMIT = 232_448  # bytes of shared memory per block on sm_90

# runs in the Triton Python: argv[1] is a JSON list of {"path", "warps", "stages"}
COMPILE = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # time the compile, not the cache
from triton.backends.compiler import GPUTarget
from triton.compiler import compile as tcompile
import re, subprocess, tempfile, triton
# the wheel's sm_90 ptxas may predate the PTX version Triton writes; its Blackwell one reads it
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas_stats(ptx):  # registers per thread and spill bytes from `ptxas -v` for sm_90a ({} if it fails)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    for exe in ("ptxas", "ptxas-blackwell"):
        r = subprocess.run([os.path.join(BIN, exe), "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
        regs = re.search(r"Used (\d+) registers", r.stderr)
        if r.returncode == 0 and regs:
            spill = re.search(r"(\d+) bytes spill stores", r.stderr)
            return {"registers": int(regs.group(1)), "spill": int(spill.group(1)) if spill else 0}
    return {}


for job in json.loads(sys.argv[1]):
    t0 = time.time()
    try:
        k = tcompile(job["path"], target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=job["warps"], num_stages=job["stages"]))
        job.update(compile_s=time.time() - t0, shared=k.metadata.shared)
        job.update(ptxas_stats(k.asm["ptx"]))
    except Exception as e:  # a failed compile is a row
        job.update(compile_s=time.time() - t0, error=f"{type(e).__name__}: {e}"[:300])
    print(json.dumps(job), flush=True)
"""


def capture(fn, args, outdir: str, tag: str) -> list[dict]:
    """Lower ``jax.grad`` of ``fn`` for cuda and write every Triton kernel's IR to ``outdir``;
    returns ``[{"path", "kernel", "warps", "stages"}]`` in lowering order."""
    from jax._src.pallas.triton import lowering, pallas_call_registration as reg

    jobs = []
    orig = lowering.lower_jaxpr_to_triton_module

    def lower(jaxpr, *a, **kw):
        res = orig(jaxpr, *a, **kw)
        caller = sys._getframe(1).f_locals  # pallas_call_lowering's resolved warps and stages
        name = jaxpr.debug_info.func_name if jaxpr.debug_info else "kernel"
        path = os.path.join(outdir, f"{tag}_{len(jobs)}_{name}.ttir")
        with open(path, "w") as f:
            f.write(res.module.operation.get_asm())
        jobs.append({"path": path, "kernel": name, "warps": int(caller["num_warps"]),
                     "stages": int(caller["num_stages"])})
        return res

    get_info = reg.gpu_info_lib.get_gpu_info
    lowering.lower_jaxpr_to_triton_module = lower
    reg.gpu_info_lib.get_gpu_info = lambda: types.SimpleNamespace(compute_capability=90)
    try:
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)  # noqa: E731
        jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = orig
        reg.gpu_info_lib.get_gpu_info = get_info
    return jobs


def op_call(op: str, dtype, d: int, chunk: int, d_v: int | None = None, config=None, heads: int = 2,
            qk_heads: int | None = None):
    """(fn, args) of one op variant at (1, ``heads``, 4 chunks, d) through ``pallas_gpu``
    (values of width ``d_v``, default ``d``; ``qk_heads`` q/k heads, default ``heads``, fewer
    for grouped heads as Mamba-2's; ``config``: a ChunkedConfig, None for the defaults)."""
    from mnemax.kernels import delta_rule, gated_linear_attention

    rng = np.random.default_rng(0)
    B, H, T = 1, heads, 4 * chunk
    q, k = (jnp.asarray(rng.standard_normal((B, qk_heads or H, T, d)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, H, T, d_v or d)), dtype)
    g_head = jnp.asarray(-np.abs(rng.standard_normal((B, H, T))), dtype)
    g_chan = jnp.asarray(-np.abs(rng.standard_normal((B, H, T, d))), dtype)
    beta = jnp.asarray(rng.random((B, H, T)), dtype)
    kw = dict(backend="pallas_gpu", interpret=False, chunk_size=chunk, config=config)
    if op in ("gla", "gla_channel"):
        g = g_head if op == "gla" else g_chan
        return (lambda q, k, v, g: gated_linear_attention(q, k, v, g, **kw)[0]), (q, k, v, g)
    if op == "deltanet":
        return (lambda q, k, v, b: delta_rule(q, k, v, b, None, **kw)[0]), (q, k, v, beta)
    if op in ("gdn", "kda"):
        g = g_head if op == "gdn" else g_chan
        return (lambda q, k, v, b, g: delta_rule(q, k, v, b, g, **kw)[0]), (q, k, v, beta, g)
    raise SystemExit(f"--ops: unknown {op!r}; expected gla, gla_channel, deltanet, gdn or kda")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton_python", required=True, help="a Python with triton 3.9 installed")
    ap.add_argument("--ops", default="gla,deltanet,gdn")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--d", type=int, default=128, help="d_k (and d_v unless --d_v)")
    ap.add_argument("--d_v", type=int, default=None, help="d_v when it differs from d_k (Mamba-2: 64)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2, help="value heads")
    ap.add_argument("--qk_heads", type=int, default=None,
                    help="q/k heads, a divisor of --heads (grouped heads, Mamba-2's 1 group: 1); default --heads")
    ap.add_argument("--config", default=None, help="ChunkedConfig fields as benchmarks/linear_attention.py takes them, "
                    "e.g. num_warps=8,bwd_warps=4")
    args = ap.parse_args()
    config = parse_config(args.config)
    outdir = tempfile.mkdtemp(prefix="ttir_")
    jobs = []
    for op in args.ops.split(","):
        for dt in args.dtypes.split(","):
            fn, call_args = op_call(op, jnp.dtype(dt), args.d, args.chunk, args.d_v, config, args.heads, args.qk_heads)
            for job in capture(fn, call_args, outdir, f"{op}_{dt}"):
                jobs.append({**job, "op": op, "dtype": dt})
    out = subprocess.run([args.triton_python, "-c", COMPILE, json.dumps(jobs)], capture_output=True, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise SystemExit(f"the Triton Python printed no rows:\n{out.stderr[-2000:]}")
    print(f"{'op':12} {'dtype':9} {'kernel':20} {'warps':>5} {'stages':>6} {'compile s':>9} {'shared B':>9} "
          f"{'regs':>5} {'spill B':>7}  note")
    for r in rows:
        note = r.get("error") or ("over the sm_90 limit" if r.get("shared", 0) > SHARED_LIMIT else "")
        print(f"{r['op']:12} {r['dtype']:9} {r['kernel']:20} {r['warps']:5d} {r['stages']:6d} "
              f"{r['compile_s']:9.1f} {r.get('shared', 0):9d} {r.get('registers', '-'):>5} {r.get('spill', '-'):>7}  {note}")


if __name__ == "__main__":
    main()
