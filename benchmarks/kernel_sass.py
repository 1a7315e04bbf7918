"""Dump the GPU selective-scan kernels' PTX and SASS, and count the SASS opcodes of each.

    python benchmarks/kernel_sass.py --out DIR [--opts chunk=16+unroll=8] [--dtype float32] [--bwd]

On the accelerator: compiles the forward-only kernel (and with ``--bwd`` the training
forward and backward) at (8, 2048, 1536, 16) with Mosaic GPU's dump switches pointed at
DIR, then prints, per dumped SASS file, the number of instructions of each opcode (``MUFU``,
``FFMA``, ``LDS``, ...) in the whole kernel and in its largest basic block (the unrolled
recurrence), so a change to the per-step math can be read off as instructions per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys


def opcode_counts(sass: str) -> tuple[collections.Counter, collections.Counter]:
    """(whole kernel, largest basic block) opcode counts of one SASS listing."""
    whole, blocks, block = collections.Counter(), [], collections.Counter()
    for line in sass.splitlines():
        if re.match(r"^\s*\.L_x_\d+:|^\s*\.L\w+:", line):  # a label starts a new block
            blocks.append(block)
            block = collections.Counter()
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[\w.]+)?", line)
        if m:
            whole[m.group(1)] += 1
            block[m.group(1)] += 1
    blocks.append(block)
    return whole, max(blocks, key=lambda c: sum(c.values()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--opts", default="", help="GPU_OPTIONS overrides, 'k=v+k=v'")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--bwd", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.environ.update(MOSAIC_GPU_DUMP_TO=os.path.abspath(args.out), MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_PTX="1",
                      MOSAIC_GPU_DUMP_PTXAS="1")

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernels import _variants

    from mnemax.kernels import pallas_selective_scan as pss

    opts = _variants(args.opts)[0] if args.opts else {}
    rng = np.random.default_rng(0)
    b, t, c, n = 8, 2048, 1536, 16
    dtype = jnp.dtype(args.dtype)
    x, dt, z = (jnp.asarray(rng.standard_normal((b, t, c)), dtype) for _ in range(3))
    Bm, Cm = (jnp.asarray(rng.standard_normal((b, t, n)), dtype) for _ in range(2))
    A = -jnp.asarray(np.tile(np.arange(1, n + 1, dtype=np.float32), (c, 1)))
    D, bias = jnp.ones((c,), jnp.float32), jnp.full((c,), -3.0, jnp.float32)

    def fwd(*a):
        p = pss.make_problem("gpu", *a[:5], a[5], a[6], a[7], None, None, True, opts=opts, training=False)
        return pss.forward("gpu", p, a[0].dtype, opts=opts)[0]

    jax.jit(fwd).lower(x, dt, A, Bm, Cm, D, z, bias).compile()
    if args.bwd:
        from mnemax.kernels.selective_scan import selective_scan

        def loss(*a):
            return jnp.sum(selective_scan(*a[:5], D=a[5], z=a[6], dt_bias=a[7], dt_softplus=True, backend="pallas_gpu")
                           .astype(jnp.float32))

        jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4))).lower(x, dt, A, Bm, Cm, D, z, bias).compile()
    for path in sorted(glob.glob(os.path.join(args.out, "*.sass"))):
        whole, inner = opcode_counts(open(path).read())
        print(f"== {os.path.basename(path)}: {sum(whole.values())} instructions, largest block {sum(inner.values())}")
        print("   kernel:", ", ".join(f"{k} {v}" for k, v in whole.most_common(24)))
        print("   block: ", ", ".join(f"{k} {v}" for k, v in inner.most_common(24)))
    for path in sorted(glob.glob(os.path.join(args.out, "*ptxas*"))):
        print(f"== {os.path.basename(path)}")
        print(open(path).read()[-1500:])


if __name__ == "__main__":
    main()
