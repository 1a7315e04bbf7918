"""Timing helpers for the accelerator benchmarks (see benchmarks/RESULTS.md for method).

Timings are medians over repeats of back-to-back asynchronous dispatches divided by
their count (so host dispatch overlaps device work), after warm-up calls that
include compilation. The device's copy bandwidth and bf16 matmul rate are measured in
the same run and used as the ceilings.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def bench(fn, *args, calls: int = 10, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds per call of ``fn(*args)`` (already jitted)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(nbytes // 4 // 4096, np.float32)).reshape(-1)
    x = jnp.tile(x, 4096)[: nbytes // 4]
    copy = jax.jit(lambda v: v + 1.0)
    t = bench(copy, x, calls=5, repeats=7)
    return 2 * x.size * 4 / t


def matmul_rate(n: int = 8192) -> float:
    """bf16 matmul FLOP/s on random data."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((n, n), np.float32), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t = bench(mm, a, b, calls=5, repeats=7)
    return 2 * n**3 / t


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    dev = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("MNEMAX_COMMIT", commit),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def save(results: dict, name: str) -> None:
    out = os.environ.get("OUT") or "."
    with open(os.path.join(out, name), "w") as f:
        json.dump(results, f, indent=2, default=float)


def table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return ""
    widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        lines.append(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def lm_train_step(model, tokens):
    """A jitted AdamW next-token step for ``model`` on ``tokens`` (batch, seq + 1).

    Returns ``(step, params, opt_state, n_params)``; ``step(params, opt, tokens)``
    returns the updated ``(params, opt, loss)``. Parameters are initialised from a
    short prefix (their shapes do not depend on the length).
    """
    import optax

    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tx = optax.adamw(1e-4)
    opt = tx.init(params)

    def loss_fn(p, tok):
        logits, _ = model.apply({"params": p}, tok[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1))

    @jax.jit
    def step(p, o, tok):
        loss, g = jax.value_and_grad(loss_fn)(p, tok)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    return step, params, opt, n_params
