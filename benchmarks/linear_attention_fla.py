"""fla's Triton kernels (flash-linear-attention 0.6.0, PyTorch), the speed peer of
``benchmarks/linear_attention.py``: forward and forward+backward times of ``chunk_simple_gla``,
``chunk_gla``, ``chunk_delta_rule``, ``chunk_gated_delta_rule`` and ``chunk_kda`` on the same
inputs (same distributions, bf16, fla's (B, T, H, D) layout, final state returned, the loss
the sum of the outputs and the final state, so every input gets a gradient).

fla 0.6's gated chunk kernels refuse Triton < 3.7.1 on Hopper (an upstream correctness
guard, fla #640); the device has Triton 3.6, so this script sets
``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`` to run them (``--no_override`` keeps the
guard) and says so in its output. fla's GLA autotunes for minutes: time it in a run of its
own (``--ops gla``).

Run on the GPU machine with the wheels carried (see benchmarks/RESULTS.md)::

    python3 benchmarks/linear_attention_fla.py --ops simple_gla,deltanet,gdn
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

OPS = ("simple_gla", "gla", "deltanet", "gdn", "kda")
SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128)]


def inputs(op, shape, seed=0):
    """The same draws as benchmarks/linear_attention.py's ``inputs``, in fla's layout."""
    B, T, H, D = shape
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, T, D), np.float32) for _ in range(3))
    delta = op in ("deltanet", "gdn", "kda")
    if delta:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, H, T)).astype(np.float32)))
    gate = {"simple_gla": "head", "gla": "channel", "deltanet": None, "gdn": "head", "kda": "channel"}[op]
    g = None
    if gate is not None:
        gshape = (B, H, T) if gate == "head" else (B, H, T, D)
        g = -np.logaddexp(0.0, rng.standard_normal(gshape).astype(np.float32) - 2.0).astype(np.float32)

    def t(a):  # (B, H, T, ...) -> (B, T, H, ...) bf16 on the GPU
        return torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 1, 2))).to("cuda", torch.bfloat16)

    x = {"q": t(q), "k": t(k), "v": t(v), "g": None if g is None else t(g), "beta": t(beta) if delta else None}
    return x


def call(op, x):
    if op == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla
        return chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"], output_final_state=True)
    if op == "gla":
        from fla.ops.gla import chunk_gla
        return chunk_gla(x["q"], x["k"], x["v"], g=x["g"], output_final_state=True)
    if op == "deltanet":
        from fla.ops.delta_rule import chunk_delta_rule
        return chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], output_final_state=True)
    if op == "gdn":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True)
    from fla.ops.kda import chunk_kda
    return chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True)


def bench(fn, reps=20, warmup=3):
    """Median milliseconds of ``fn()`` over ``reps`` (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def rows_for(op, shape):
    row = {"op": op, "shape": str(shape), "dtype": "bfloat16", "backend": "fla 0.6.0 (Triton)"}
    try:
        x = inputs(op, shape)
        leaves = {n: a.requires_grad_(True) for n, a in x.items() if a is not None}

        def fwd():
            with torch.no_grad():
                return call(op, x)

        def fwdbwd():
            o, S = call(op, x)
            loss = o.float().sum() + S.float().sum()
            torch.autograd.grad(loss, list(leaves.values()))

        row["fwd_ms"] = bench(fwd)
        row["fwdbwd_ms"] = bench(fwdbwd)
    except Exception as e:  # noqa: BLE001 - a failing variant is a row, not the end of the run
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    print(row, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,H,D (default: issue 34's two shapes)")
    ap.add_argument("--no_override", action="store_true", help="keep fla's Triton >= 3.7.1 guard")
    args = ap.parse_args()
    import fla
    import triton

    override = not args.no_override
    if override:
        import fla.ops.common.chunk_o as chunk_o
        chunk_o.TRITON_ABOVE_3_7_1 = True
    env = {"torch": torch.__version__, "triton": triton.__version__, "fla": getattr(fla, "__version__", "?"),
           "device": torch.cuda.get_device_name(), "TRITON_ABOVE_3_7_1 override": override}
    print(env, flush=True)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    rows = [rows_for(op, shape) for shape in shapes for op in args.ops.split(",") if op]
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "linear_attention_fla.json"), "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    print(f"{'op':12s} {'shape':22s} {'fwd_ms':>8s} {'fwdbwd_ms':>10s}")
    for r in rows:
        print(f"{r['op']:12s} {r['shape']:22s} {r.get('fwd_ms', float('nan')):8.3f} {r.get('fwdbwd_ms', float('nan')):10.3f}"
              f" {r.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
