"""The matrix-state ops on the accelerator: ``gated_linear_attention`` and ``delta_rule``
(every backend the op has), beside cuDNN's softmax attention at the same shape.

For each op variant (GLA with a decay per head or per key channel, the delta rule without a
decay, per head (Gated DeltaNet) and per key channel (KDA)) and each shape (B, T, H, d_k =
d_v), bf16 inputs: a correctness check of each fast backend against ``reference`` at a small
shape on the device (outputs, final state, gradients; fp32), then forward and forward+backward
times (the loss is the sum of the outputs and the final state, so every input gets a
gradient). The table is printed last; the JSON goes to ``$OUT/linear_attention.json``.

Run on the GPU machine::

    python3 benchmarks/linear_attention.py                    # issue 34's shapes
    python3 benchmarks/linear_attention.py --shapes 8,2048,16,128 --ops gdn

fla's Triton kernels (the speed peer) are timed by ``benchmarks/linear_attention_fla.py`` on the
same inputs; ``benchmarks/issue34_gpu.sh`` runs both as one device call each.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, environment, save, table  # noqa: E402

from mnemax.kernels import delta_rule, gated_linear_attention  # noqa: E402
from mnemax.kernels.chunked_gpu import ChunkedConfig  # noqa: E402
from mnemax.kernels.delta_rule import BACKENDS as DELTA_BACKENDS  # noqa: E402
from mnemax.kernels.gated_linear_attention import BACKENDS as GLA_BACKENDS  # noqa: E402

# op name -> (which op, its decay: None, "head" (one per head) or "channel" (one per key channel))
OPS = {
    "simple_gla": ("gla", "head"),
    "gla": ("gla", "channel"),
    "deltanet": ("delta", None),
    "gdn": ("delta", "head"),
    "kda": ("delta", "channel"),
}
SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128)]
CHECK = True  # --no_check: time only
CHECK_D = 64  # --check_d: the head size of the fp32 and bf16 checks' shape (2, 300, 2, CHECK_D)
CONFIG = None  # --config: the Pallas GPU kernels' ChunkedConfig (None: the defaults)
CHUNK = 64  # the chunk size of every call (linear_attention_kernels.py --chunks sets it)
GROUPS = 1  # --groups: value heads per q/k head (grouped heads; 1: none)


def parse_shape(text: str) -> tuple[int, ...]:
    """``--shapes``: ``B,T,H,D`` (d_k = d_v = D) or ``B,T,H,Dk,Dv`` (Mamba-2's layer: 128, 64)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise SystemExit(f"--shapes: got {text!r}; expected B,T,H,D or B,T,H,Dk,Dv of positive ints")
    return shape


def inputs(op: str, shape, dtype, seed=0):
    """q, k (B, H / GROUPS, T, Dk), v (B, H, T, Dv), beta and g of ``op`` at ``shape`` (see
    :func:`parse_shape`), in ``dtype``."""
    kind, gate = OPS[op]
    B, T, H, D, *dv = shape
    if H % GROUPS:
        raise SystemExit(f"--groups: {GROUPS} does not divide the {H} heads of shape {shape}")
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, H // GROUPS, T, D), np.float32) for _ in range(2))
    v = rng.standard_normal((B, H, T, dv[0] if dv else D), np.float32)
    if kind == "delta":
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, H, T)).astype(np.float32)))
    g = None
    if gate is not None:
        gshape = (B, H, T) if gate == "head" else (B, H, T, D)
        g = -np.logaddexp(0.0, rng.standard_normal(gshape).astype(np.float32) - 2.0).astype(np.float32)
    arrs = dict(q=q, k=k, v=v, beta=beta if kind == "delta" else None, g=g)
    return {n: None if a is None else jnp.asarray(a, dtype) for n, a in arrs.items()}


def call(op: str, x: dict, backend: str, chunk_size: int | None = None):
    chunk_size = CHUNK if chunk_size is None else chunk_size
    kw = {"config": CONFIG} if CONFIG is not None and backend == "pallas_gpu" else {}
    if OPS[op][0] == "gla":
        return gated_linear_attention(x["q"], x["k"], x["v"], x["g"], backend=backend, chunk_size=chunk_size, **kw)
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], backend=backend, chunk_size=chunk_size, **kw)


def config_label(config: ChunkedConfig | None) -> str:
    """The fields of ``config`` that differ from the defaults, as ``--config`` takes them."""
    if config is None:
        return "default"
    value = lambda v: int(v) if isinstance(v, bool) else v  # noqa: E731  (a bool field as 0/1)
    changed = [f"{n}={value(getattr(config, n))}" for n in ChunkedConfig.__dataclass_fields__
               if getattr(config, n) != getattr(ChunkedConfig(), n)]
    return ",".join(changed) or "default"


def parse_config(text: str | None) -> ChunkedConfig | None:
    """``--config``: comma-separated ``field=number`` of :class:`ChunkedConfig` (None or empty:
    the defaults; ints stay ints, 0/1 set a bool field, e.g. ``wy_block=64,span_limit=0.0,form_per_call=0``); an unknown field or a
    bad value ends the run naming it."""
    if not text:
        return None
    fields = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            number = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            number = None
        if name not in ChunkedConfig.__dataclass_fields__ or number is None:
            raise SystemExit(f"--config: got {item!r}; expected field=number with a field of "
                             f"{list(ChunkedConfig.__dataclass_fields__)}")
        fields[name] = bool(number) if isinstance(getattr(ChunkedConfig(), name), bool) else number
    try:
        return ChunkedConfig(**fields)
    except ValueError as e:
        raise SystemExit(f"--config: {e}") from e


def loss_fn(op, backend):
    def loss(x):
        o, S = call(op, x, backend)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    return loss


def programs(op: str, backend: str, x: dict):
    """(forward, forward+backward): ``op`` through ``backend`` on the inputs ``x``, jitted
    functions of the dict of its arrays (:func:`diff_args`); every timed and checked program
    of this script, and what :func:`precompile` compiles ahead."""
    fwd = jax.jit(lambda d: call(op, {**x, **d}, backend))
    fb = jax.jit(jax.grad(lambda d: loss_fn(op, backend)({**x, **d})))
    return fwd, fb


def diff_args(x: dict) -> dict:
    return {n: a for n, a in x.items() if a is not None}


def check_inputs(op: str, seed: int, widen: bool = False) -> dict:
    """The checks' inputs at (2, 300, 2, CHECK_D): seed 1 float32 (the float32 check), seed 2
    bf16 (the bf16 check), ``widen``: back to float32 (its reference's inputs)."""
    x = inputs(op, (2, 300, 2, CHECK_D), jnp.float32 if seed == 1 else jnp.bfloat16, seed=seed)
    return {n: None if a is None else a.astype(jnp.float32) for n, a in x.items()} if widen else x


def _checked(op: str, backend: str, x: dict) -> list:
    """The outputs, final state and gradients of ``backend`` on the inputs ``x`` (a check's)."""
    with jax.default_matmul_precision("highest"):
        return jax.tree.leaves(tuple(f(diff_args(x)) for f in programs(op, backend, x)))


@functools.cache  # the reference once per op and check, not per backend checked against it
def _reference(op: str, seed: int) -> list:
    """``reference``'s leaves (float64 numpy) on the float32 check inputs of ``seed`` (1: the
    float32 check's inputs; 2: the bf16 check's, rounded to bf16 then widened)."""
    return [np.asarray(a, np.float64) for a in _checked(op, "reference", check_inputs(op, seed, widen=True))]


def backends_of(op: str, only=None) -> list[str]:
    """The backends timed for ``op``: all but ``reference``, or those in ``only``."""
    kind, _ = OPS[op]
    return [b for b in (GLA_BACKENDS if kind == "gla" else DELTA_BACKENDS).available() if b != "reference"
            and (only is None or b in only)]


def precompile(ops, shapes, only, workers: int) -> float:
    """Compile every program the run will check and time, ``workers`` at a time, into JAX's
    persistent compilation cache (a fresh temporary directory), so that the run itself finds
    each compiled: XLA's compile (the Pallas kernels' Triton compile inside it) releases the
    GIL, and on the device machine's 16 cores the table's compiles took most of a call when run
    one after another. The programs are :func:`programs`' at the same inputs, hence the same
    cache keys; the rows' ``*_compile_s`` then time cache hits. Returns the seconds spent."""
    import concurrent.futures
    import tempfile

    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="la_jax_cache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jobs = []  # (precision or None, op, backend, inputs)
    for op in ops:
        if CHECK:
            for seed in (1, 2):
                jobs.append(("highest", op, "reference", check_inputs(op, seed, widen=True)))
                jobs += [("highest", op, b, check_inputs(op, seed)) for b in backends_of(op, only)]
        jobs += [(None, op, b, inputs(op, shape, jnp.bfloat16)) for shape in shapes for b in backends_of(op, only)]

    def compile_one(job):
        precision, op, backend, x = job
        with jax.default_matmul_precision(precision):
            for f in programs(op, backend, x):
                f.lower(diff_args(x)).compile()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for job, fut in [(j, pool.submit(compile_one, j)) for j in jobs]:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - the run itself reports the failing row
                print(f"precompile {job[1]} {job[2]}: {type(e).__name__}: {e}"[:300], flush=True)
    seconds = time.perf_counter() - t0
    print(f"precompiled {len(jobs)} programs x 2 with {workers} threads in {seconds:.1f} s", flush=True)
    return seconds


@functools.cache  # at a fixed small shape: once per op and backend, not per timed shape
def check(op: str, backend: str) -> float:
    """The largest gradient/output error of ``backend`` vs ``reference`` relative to the
    reference's largest entry, fp32, at (2, 300, 2, CHECK_D) on this device."""
    x = check_inputs(op, 1)
    worst = 0.0
    for got, want in zip(_checked(op, backend, x), _reference(op, 1)):
        worst = max(worst, float(np.max(np.abs(np.asarray(got, np.float64) - want)) / max(np.max(np.abs(want)), 1.0)))
    return worst


@functools.cache  # at a fixed small shape: once per op and backend, not per timed shape
def check_bf16(op: str, backend: str) -> float:
    """The largest relative-norm error (||got - want|| / ||want||) of ``backend`` on bf16 inputs
    against ``reference`` in float32 on the same bf16-rounded inputs, over outputs, final state
    and gradients, at (2, 300, 2, CHECK_D) on this device (the tests' bf16 limits: 3e-3 outputs,
    5e-3 gradients)."""
    x16 = check_inputs(op, 2)
    worst = 0.0
    for got, want in zip(_checked(op, backend, x16), _reference(op, 2)):
        got = np.asarray(got, np.float64)
        worst = max(worst, float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))
    return worst


def op_rows(op: str, shape, only=None) -> list[dict]:
    rows = []
    for backend in backends_of(op, only):
        row = {"op": op, "shape": str(shape) + (f" groups {GROUPS}" if GROUPS > 1 else ""), "dtype": "bfloat16",
               "backend": backend}
        if CONFIG is not None and backend == "pallas_gpu":
            row["config"] = config_label(CONFIG)
        try:
            if CHECK:
                row["check_err"] = check(op, backend)
                row["check_bf16"] = check_bf16(op, backend)
            x = inputs(op, shape, jnp.bfloat16)
            diff = diff_args(x)
            fwd, fb = programs(op, backend, x)
            t0 = time.perf_counter()
            fwd = fwd.lower(diff).compile()
            row["fwd_compile_s"] = time.perf_counter() - t0
            print(row, flush=True)
            row["fwd_ms"] = 1e3 * bench(fwd, diff)
            t0 = time.perf_counter()
            fb = fb.lower(diff).compile()
            row["fwdbwd_compile_s"] = time.perf_counter() - t0
            print(row, flush=True)
            row["fwdbwd_ms"] = 1e3 * bench(fb, diff)
        except Exception as e:  # noqa: BLE001 - a failing variant is a row, not the end of the run
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
        rows.append(row)
        print(row, flush=True)
    return rows


def parse_ops(text: str) -> list[str]:
    """``--ops``: comma-separated names of :data:`OPS`; an unknown one ends the run naming it."""
    ops = [o for o in text.split(",") if o]
    bad = sorted(set(ops) - set(OPS))
    if bad:
        raise SystemExit(f"--ops: unknown {bad}; expected some of {list(OPS)}")
    return ops


def cudnn_rows(shape) -> list[dict]:
    """Causal softmax attention (``jax.nn.dot_product_attention``, cuDNN) at the same shape
    (heads of width D = d_k)."""
    B, T, H, D = shape[:4]
    row = {"op": "softmax attention", "shape": str(shape), "dtype": "bfloat16", "backend": "cudnn"}
    try:
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, D), np.float32), jnp.bfloat16) for _ in range(3))

        def attn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        fwd = jax.jit(attn)
        fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        row["fwd_ms"] = 1e3 * bench(fwd, q, k, v)
        row["fwdbwd_ms"] = 1e3 * bench(fb, q, k, v)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    print(row, flush=True)
    return [row]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {list(OPS)}")
    ap.add_argument("--shapes", nargs="*", default=None, help="B,T,H,D or B,T,H,Dk,Dv (default: issue 34's two shapes)")
    ap.add_argument("--no_cudnn", action="store_true")
    ap.add_argument("--backends", default=None, help="comma-separated backends to time (default: all but reference)")
    ap.add_argument("--no_check", action="store_true", help="skip the fp32 check against reference")
    ap.add_argument("--check_d", type=int, default=64,
                    help="head size of the fp32/bf16 checks' shape (2, 300, 2, D); 128 compiles the float32 kernels at d_k 128")
    ap.add_argument("--config", default=None, help="pallas_gpu's ChunkedConfig fields, e.g. wy_block=64,block_v=32")
    ap.add_argument("--groups", type=int, default=1,
                    help="value heads per q/k head (grouped heads, e.g. 2 for Qwen3-Next's GDN layout; the checks too)")
    ap.add_argument("--precompile", type=int, default=0, metavar="THREADS",
                    help="compile every checked and timed program first, THREADS at a time, into a persistent "
                         "compilation cache (0: compile each when its row runs)")
    args = ap.parse_args()
    global CHECK, CHECK_D, CONFIG, GROUPS
    CHECK = not args.no_check
    CHECK_D = args.check_d
    GROUPS = args.groups
    CONFIG = parse_config(args.config)
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else SHAPES
    ops = parse_ops(args.ops)
    env = environment()
    print(env, flush=True)
    only = None if args.backends is None else args.backends.split(",")
    if args.precompile:
        env["precompile_s"] = precompile(ops, shapes, only, args.precompile)
    rows = []
    for shape in shapes:
        for op in ops:
            rows += op_rows(op, shape, only)
        if not args.no_cudnn and jax.default_backend() == "gpu":
            rows += cudnn_rows(shape)
    save({"env": env, "rows": rows}, "linear_attention.json")
    print(table(rows, ["op", "shape", "dtype", "backend", "config", "check_err", "check_bf16", "fwd_compile_s", "fwd_ms", "fwdbwd_compile_s", "fwdbwd_ms", "error"]))


if __name__ == "__main__":
    main()
