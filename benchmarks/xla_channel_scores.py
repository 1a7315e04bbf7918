"""The ``xla`` backend's per-channel decays (GLA, KDA) with their intra-chunk scores factored
(one matmul per chunk, the default for chunks spanning <= ``chunked.SPAN_LIMIT`` nats) or
sub-chunked (forced here by a span limit of -1: every call takes the form every exponent
<= 0 needs), timed in the same process on whatever device JAX has.

    python benchmarks/xla_channel_scores.py [--shape 2,1024,4,64] [--chunk 64] [--dtype float32]

Inputs are ``benchmarks/linear_attention.py``'s draws (gates ``-softplus(z - 2)``, whose
chunks of 64 span ~10-20 nats: the factored form). Each row: forward and forward+backward
(the gradient of sum(o) + sum(final state) w.r.t. every input) medians, both forms'
outputs' largest difference relative to the largest entry, and the speed-up. The table is
printed last; the JSON goes to ``$OUT/xla_channel_scores.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, environment, save, table  # noqa: E402

from mnemax.kernels import chunked, delta_rule, gated_linear_attention  # noqa: E402


def inputs(shape, dtype):
    B, T, H, D = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, T, D), np.float32) for _ in range(3))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, H, T)).astype(np.float32)))
    g = -np.logaddexp(0.0, rng.standard_normal((B, H, T, D)).astype(np.float32) - 2.0)
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v, beta, g))


def loss(op, chunk):
    def f(q, k, v, beta, g):
        if op == "kda":
            o, S = delta_rule(q, k, v, beta, g, backend="xla", chunk_size=chunk)
        else:
            o, S = gated_linear_attention(q, k, v, g, backend="xla", chunk_size=chunk)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S), o

    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2,1024,4,64", help="B,T,H,D")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    x = inputs(shape, jnp.dtype(args.dtype))
    rows, default = [], chunked.SPAN_LIMIT
    for op in ("gla", "kda"):
        times, outs = {}, {}
        for form, limit in (("factored", default), ("sub-chunked", -1.0)):
            chunked.SPAN_LIMIT = limit  # read when the op is traced: its jitted parts are dropped first
            jax.clear_caches()
            f = loss(op, args.chunk)
            fwd = jax.jit(lambda *a, f=f: f(*a)[1])
            both = jax.jit(jax.grad(lambda *a, f=f: f(*a)[0], argnums=(0, 1, 2, 3, 4)))
            outs[form] = np.asarray(fwd(*x), np.float64)
            times[form] = (bench(fwd, *x, calls=3, repeats=5), bench(both, *x, calls=3, repeats=5))
        chunked.SPAN_LIMIT = default
        diff = float(np.max(np.abs(outs["factored"] - outs["sub-chunked"])) / np.max(np.abs(outs["sub-chunked"])))
        for form in times:
            rows.append({"op": op, "form": form, "shape": str(shape), "dtype": args.dtype,
                         "fwd_ms": times[form][0] * 1e3, "fwd_bwd_ms": times[form][1] * 1e3, "out_diff": diff,
                         "speedup_fwd": times["sub-chunked"][0] / times[form][0],
                         "speedup_fwd_bwd": times["sub-chunked"][1] / times[form][1]})
            print(rows[-1], flush=True)
    save({"env": environment(), "rows": rows}, "xla_channel_scores.json")
    print(table(rows, ["op", "form", "shape", "dtype", "fwd_ms", "fwd_bwd_ms", "out_diff", "speedup_fwd",
                       "speedup_fwd_bwd"]))


if __name__ == "__main__":
    main()
