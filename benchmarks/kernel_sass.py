"""The GPU selective-scan kernels' PTX, and the SASS opcode counts of each kernel.

For a profiler (``ncu``): ``run`` compiles and calls the forward-only kernel twice, then one
training forward and its backward, at the same shape:

    ncu --clock-control none --kernel-name regex:mosaic --launch-skip 1 --launch-count 3 \
        --section WarpStateStats python benchmarks/kernel_sass.py run [--opts ...]

On the accelerator (Mosaic GPU's dump switches; the PTX goes to DIR/kernel_<i>.ptx):

    python benchmarks/kernel_sass.py dump --out DIR [--opts chunk=16+unroll=8] [--dtype float32] [--bwd]

compiles the forward-only kernel (with ``--bwd`` also the training forward and the
backward) at (8, 2048, 1536, 16). Anywhere with CUDA's ``ptxas`` and ``nvdisasm`` (the PyPI
wheels nvidia-cuda-nvcc-cu12 and nvidia-cuda-nvdisasm carry them):

    python benchmarks/kernel_sass.py count DIR/kernel_0.ptx --ptxas PATH --nvdisasm PATH

assembles it for sm_90a and prints the number of instructions of each opcode (``MUFU``,
``FFMA``, ``LDS``, ...) in the whole kernel and in its largest basic block (the unrolled
recurrence), so a change to the per-step math reads off as instructions per step.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile


def opcode_counts(sass: str) -> tuple[collections.Counter, collections.Counter]:
    """(whole kernel, largest basic block) opcode counts of one SASS listing."""
    whole, blocks, block = collections.Counter(), [], collections.Counter()
    for line in sass.splitlines():
        if re.match(r"^\s*\.L\w+:", line):  # a label starts a new block
            blocks.append(block)
            block = collections.Counter()
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[\w.]+)?", line)
        if m:
            whole[m.group(1)] += 1
            block[m.group(1)] += 1
    blocks.append(block)
    return whole, max(blocks, key=lambda c: sum(c.values()))


def split_ptx(text: str) -> list[str]:
    """The PTX modules in a dump (each starts at a ``.version`` line)."""
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("ptxas", "    0 bytes stack")))
    starts = [m.start() for m in re.finditer(r"^\s*\.version", text, flags=re.M)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def _problem(args):
    """(jitted forward-only fn, jitted training grad fn, inputs) at (8, 2048, 1536, 16)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernels import _variants

    from mnemax.kernels import selective_scan
    from mnemax.kernels.selective_scan import SelectiveScanConfig, gpu

    config = SelectiveScanConfig(**(_variants(args.opts)[0] if args.opts else {}))
    rng = np.random.default_rng(0)
    b, t, c, n = 8, 2048, 1536, 16
    dtype = jnp.dtype(args.dtype)
    x, dt, z = (jnp.asarray(rng.standard_normal((b, t, c)), dtype) for _ in range(3))
    Bm, Cm = (jnp.asarray(rng.standard_normal((b, t, n)), dtype) for _ in range(2))
    A = -jnp.asarray(np.tile(np.arange(1, n + 1, dtype=np.float32), (c, 1)))
    D, bias = jnp.ones((c,), jnp.float32), jnp.full((c,), -3.0, jnp.float32)

    def fwd(*a):
        p = gpu.make_problem(config, *a[:5], a[5], a[6], a[7], None, None, True, training=False)
        return gpu.forward(config, p, a[0].dtype)[0]

    def loss(*a):
        return jnp.sum(selective_scan(*a[:5], D=a[5], z=a[6], dt_bias=a[7], dt_softplus=True,
                                      backend="pallas_gpu", config=config).astype(jnp.float32))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4))), (x, dt, A, Bm, Cm, D, z, bias)


def run(args):
    import jax

    fwd, grad, ins = _problem(args)
    for _ in range(2):
        jax.block_until_ready(fwd(*ins))
    jax.block_until_ready(grad(*ins))


def dump(args):
    os.makedirs(args.out, exist_ok=True)
    os.environ.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
    fwd, grad, ins = _problem(args)
    log = os.path.join(args.out, "dump.log")
    sys.stdout.flush()
    saved = os.dup(1)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)  # the dumps go to the C++ stdout
        try:
            fwd.lower(*ins).compile()
            if args.bwd:
                grad.lower(*ins).compile()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
    text = open(log).read()
    for i, ptx in enumerate(split_ptx(text)):
        with open(os.path.join(args.out, f"kernel_{i}.ptx"), "w") as f:
            f.write(ptx)
    for line in text.splitlines():
        if line.startswith("ptxas info") and ("registers" in line or "Compiling" in line or "spill" in line):
            print(line)


def count(args):
    ptx = split_ptx(open(args.ptx).read())[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cubin = os.path.join(tmp, "k.cubin")
        subprocess.run([args.ptxas, "-arch=sm_90a", "-O3", "-o", cubin, src], check=True)
        sass = subprocess.run([args.nvdisasm, "-c", cubin], check=True, capture_output=True, text=True).stdout
    whole, inner = opcode_counts(sass)
    print(f"{os.path.basename(args.ptx)}: {sum(whole.values())} instructions, largest block {sum(inner.values())}")
    print("  kernel:", ", ".join(f"{k} {v}" for k, v in whole.most_common(30)))
    print("  block: ", ", ".join(f"{k} {v}" for k, v in inner.most_common(30)))
    if args.sass_out:
        with open(args.sass_out, "w") as f:
            f.write(sass)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--out", required=True)
    d.add_argument("--bwd", action="store_true")
    r = sub.add_parser("run")
    for p in (d, r):
        p.add_argument("--opts", default="", help="SelectiveScanConfig fields, 'k=v+k=v'")
        p.add_argument("--dtype", default="float32")
    c = sub.add_parser("count")
    c.add_argument("ptx")
    c.add_argument("--ptxas", default="ptxas")
    c.add_argument("--nvdisasm", default="nvdisasm")
    c.add_argument("--sass_out", default="")
    args = ap.parse_args()
    {"dump": dump, "run": run, "count": count}[args.cmd](args)


if __name__ == "__main__":
    main()
