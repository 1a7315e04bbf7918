"""Where the time of a ``pallas_gpu`` matrix-state op goes: every Pallas kernel of its forward
and backward timed on its own, beside the whole forward and forward+backward.

The op's forward and gradient run once eagerly (``jax.disable_jit``), with ``pl.pallas_call``
wrapped to record each kernel and its concrete inputs; each recorded call is then jitted and
timed alone (``benchmarks/common.py``'s method). The rest of the total (layout changes,
padding, the reverse cumulative sum of the decay gradient) is the ``xla glue`` row. Same
inputs as ``benchmarks/linear_attention.py``; the table is printed last and the JSON goes to
``$OUT/linear_attention_kernels.json``.

    python3 benchmarks/linear_attention_kernels.py --ops gdn,kda --shapes 8,2048,16,128
    python3 benchmarks/linear_attention_kernels.py --ops gdn --config "" bwd_warps=4 wy_block=64
    python3 benchmarks/linear_attention_kernels.py --ops simple_gla --shapes 8,2048,24,128,64 --chunks 64 32
    python3 benchmarks/linear_attention_kernels.py --ops simple_gla --shapes 8,2048,24,128,64 --groups 24 \
        --config "" group_heads=4 group_heads=8 group_heads=24    # Mamba-2's one group of B and C
    python3 benchmarks/linear_attention_kernels.py --interpret --shapes 1,64,2,16   # CPU logic check
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, environment, save, table  # noqa: E402
import linear_attention  # noqa: E402
from linear_attention import OPS, call, config_label, inputs, loss_fn, parse_config, parse_ops, parse_shape  # noqa: E402


def recorded_kernels(op: str, x: dict) -> list[tuple]:
    """``(name, phase, the kernel's pallas_call, its inputs)`` for every Pallas kernel the op's
    forward and gradient run, in order (phase ``fwd`` or ``bwd``)."""
    calls, phase = [], ["fwd"]
    original = pl.pallas_call

    def recording(kernel, *args, **kwargs):
        fn = original(kernel, *args, **kwargs)
        base = kernel.func if isinstance(kernel, functools.partial) else kernel
        name = kwargs.get("name") or getattr(base, "__name__", "kernel")
        module = getattr(base, "__module__", "").rsplit(".", 2)[-2:]

        def call(*operands):
            calls.append((f"{'.'.join(module)}.{name}", phase[0], fn, operands))
            with jax.disable_jit(False):  # traced under jit: fori_loop stays a loop (multiple_of needs one)
                return jax.jit(fn)(*operands)

        return call

    diff = {n: a for n, a in x.items() if a is not None}

    def run(d):
        return call(op, {**x, **d}, "pallas_gpu")

    pl.pallas_call = recording
    try:
        with jax.disable_jit():
            out, vjp = jax.vjp(run, diff)
            phase[0] = "bwd"
            vjp(jax.tree.map(jnp.ones_like, out))
    finally:
        pl.pallas_call = original
    return calls


def rows_for(op: str, shape) -> list[dict]:
    x = inputs(op, shape, jnp.bfloat16)
    diff = {n: a for n, a in x.items() if a is not None}
    base = {"op": op, "shape": str(shape) + (f" groups {linear_attention.GROUPS}" if linear_attention.GROUPS > 1 else ""),
            "dtype": "bfloat16", "chunk": linear_attention.CHUNK,
            "config": config_label(linear_attention.CONFIG)}
    fwd = jax.jit(lambda d: call(op, {**x, **d}, "pallas_gpu"))
    fb = jax.jit(jax.grad(lambda d: loss_fn(op, "pallas_gpu")({**x, **d})))
    total = {"fwd": 1e3 * bench(fwd, diff), "fwd+bwd": 1e3 * bench(fb, diff)}
    rows, spent = [], {"fwd": 0.0, "bwd": 0.0}
    for name, phase, fn, operands in recorded_kernels(op, x):
        ms = 1e3 * bench(jax.jit(fn), *operands)
        spent[phase] += ms
        rows.append({**base, "kernel": name, "phase": phase, "ms": ms})
    rows.append({**base, "kernel": "xla glue (forward total - kernels)", "phase": "fwd",
                 "ms": total["fwd"] - spent["fwd"]})
    rows.append({**base, "kernel": "xla glue (fwd+bwd total - kernels)", "phase": "fwd+bwd",
                 "ms": total["fwd+bwd"] - spent["fwd"] - spent["bwd"]})
    rows += [{**base, "kernel": f"total {p}", "phase": p, "ms": ms} for p, ms in total.items()]
    for r in rows:
        print(r, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {list(OPS)}")
    ap.add_argument("--shapes", nargs="*", default=["8,2048,16,128"], help="B,T,H,D or B,T,H,Dk,Dv")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernels in interpret mode (MNEMAX_PALLAS_INTERPRET=1; a CPU check of the script)")
    ap.add_argument("--config", nargs="*", default=[""],
                    help="ChunkedConfig variants to time in turn, each comma-separated field=int (\"\": the "
                         "defaults), e.g. --config \"\" bwd_warps=4 wy_block=64")
    ap.add_argument("--chunks", nargs="*", type=int, default=[64], help="chunk sizes to time in turn")
    ap.add_argument("--groups", type=int, default=1,
                    help="value heads per q/k head (grouped heads; mamba2-130m's one group of 24 heads: 24)")
    args = ap.parse_args()
    linear_attention.GROUPS = args.groups
    if any(c < 16 or c & (c - 1) for c in args.chunks):
        raise SystemExit(f"--chunks: got {args.chunks}; expected powers of two >= 16")
    configs = [parse_config(c) for c in args.config]
    if args.interpret:
        os.environ["MNEMAX_PALLAS_INTERPRET"] = "1"
    ops = parse_ops(args.ops)
    env = environment()
    print(env, flush=True)
    rows = []
    for s in args.shapes:
        shape = parse_shape(s)
        for op in ops:
            for chunk in args.chunks:
                for config in configs:
                    linear_attention.CONFIG, linear_attention.CHUNK = config, chunk
                    rows += rows_for(op, shape)
    save({"env": env, "rows": rows}, "linear_attention_kernels.json")
    print(table(rows, ["op", "shape", "chunk", "config", "phase", "kernel", "ms"]))


if __name__ == "__main__":
    main()
