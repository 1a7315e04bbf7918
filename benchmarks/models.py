"""End-to-end training-step benchmark of zoo models on the accelerator.

    python benchmarks/models.py --runs "mamba-130m:backend=pallas_gpu" "mamba-130m:backend=xla" \\
        --batch 8 --seq 2048

Each run builds the preset (``preset:key=value,...`` overrides), bf16 compute with
float32 parameters, AdamW, next-token cross-entropy, and times the jitted step
(median of repeats after warm-up). It reports step time, tokens/s, model FLOPs
utilisation (6 * params * tokens / time / peak, peak measured here with a bf16
matmul), and memory: the compiled step's temporaries and the device's peak bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, environment, lm_train_step, matmul_rate, save, table  # noqa: E402

import mnemax  # noqa: E402


def parse(spec: str):
    preset, _, rest = spec.partition(":")
    overrides = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=")
        try:
            v = int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                v = {"None": None, "True": True, "False": False}.get(v, v)
        overrides[k] = v
    return preset, overrides


def train_step_row(spec: str, batch: int, seq: int, peak_flops: float) -> dict:
    preset, overrides = parse(spec)
    model = mnemax.create(preset, dtype="bfloat16", **overrides)
    cfg = model.config
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32)
    step, params, opt, n_params = lm_train_step(model, tokens)

    compiled = step.lower(params, opt, tokens).compile()
    mem = compiled.memory_analysis()
    p, o, loss = compiled(params, opt, tokens)  # the AOT-compiled step: jit would compile it again
    t = bench(lambda: compiled(params, opt, tokens), calls=3, repeats=5, warmup=1)
    stats = jax.devices()[0].memory_stats() or {}
    toks = batch * seq
    return {
        "run": spec, "params_M": n_params / 1e6, "batch": batch, "seq": seq, "step_ms": t * 1e3,
        "tokens_per_s": toks / t, "MFU": 6 * n_params * toks / t / peak_flops, "loss": float(loss),
        "temp_GB": getattr(mem, "temp_size_in_bytes", 0) / 1e9, "peak_GB": stats.get("peak_bytes_in_use", 0) / 1e9,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    env = environment()
    print(env, flush=True)
    peak = matmul_rate()
    print(f"bf16 matmul: {peak / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for spec in args.runs:
        try:
            rows.append(train_step_row(spec, args.batch, args.seq, peak))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"run": spec, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(table(rows, COLUMNS), flush=True)
    save({"env": env, "matmul_flops": peak, "rows": rows}, "models.json")
    print("\n" + table(rows, COLUMNS))


COLUMNS = ["run", "params_M", "batch", "seq", "step_ms", "tokens_per_s", "MFU", "loss", "temp_GB", "peak_GB", "error"]

if __name__ == "__main__":
    main()
