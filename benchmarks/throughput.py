"""Model throughput and generation on one accelerator (issue 10).

    python benchmarks/throughput.py [--families transformer,mamba,xlstm] [--contexts 2048,8192,32768]
        [--tokens 16384] [--prefill 16384] [--prefill_chunk 2048] [--gen 64]
        [--remat_from 16384] [--remat_policy nothing,dots,dots_all,off] [--kernel_config group_heads=8]

Training: for each context length and each family's ~125M preset, a jitted AdamW step
on ``--tokens`` tokens per step (batch = tokens / context; blocks rematerialised from
``--remat_from`` on), bf16 compute: step time, tokens/s, MFU (6 * params * tokens / time over the bf16 matmul rate measured here).

Generation: prefill ``--prefill`` tokens in chunks of ``--prefill_chunk`` (carrying the
state), then ``--gen`` one-token steps from the returned state (the Transformer from its KV cache, recurrent families from
their state), at batch 1 and 32: generated tokens/s and the bytes of the state that
generation carries, at 1/4, 1/2 and all of the prefill length (flat for recurrent
families, growing for attention).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, environment, lm_train_step, matmul_rate, save, table  # noqa: E402

import mnemax  # noqa: E402
from mnemax.layers import cache_discretized  # noqa: E402

FAMILIES = {
    "transformer": ("transformer-125m", {"implementation": "cudnn", "scan_layers": True}),
    "mamba": ("mamba-130m", {"scan_layers": True}),
    # the matrix-state families on their Pallas GPU kernels (opt-in backends)
    "mamba2": ("mamba2-130m", {"scan_layers": True, "backend": "pallas_gpu"}),
    "gdn": ("gdn-125m", {"scan_layers": True, "backend": "pallas_gpu"}),
    "mamba2-xla": ("mamba2-130m", {"scan_layers": True, "backend": "xla"}),
    "gdn-xla": ("gdn-125m", {"scan_layers": True, "backend": "xla"}),
    "xlstm": ("xlstm-125m", {"scan_layers": True}),  # scanned in groups of 8 blocks (7 mLSTM, 1 sLSTM)
    "memmamba": ("memmamba-130m", {"pool_chunk": 64, "scan_layers": True}),  # scanned in groups of 4 layers
    "s4d": ("s4d-125m", {}),
    "lssl": ("lssl-125m", {}),
    "hopfield": ("hopfield-125m", {}),
    "hcam": ("hcam-125m", {}),
}  # ELM is a neuron model (spike-train inputs, a classifier head), not a language model: not here


def make(name, context, **extra):
    preset, ov = FAMILIES[name]
    ov = {**ov, **extra}
    if "window" in mnemax.get_config(preset).block:
        ov["window"] = context
    return mnemax.create(preset, dtype="bfloat16", **ov)


def _tiny(preset: str) -> str:
    """The tiny preset of ``preset``'s family (for ``--tiny`` dry runs)."""
    family = mnemax.get_config(preset).family
    return next(p for p in mnemax.list_models() if p.endswith("-tiny") and mnemax.get_config(p).family == family)


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def train_row(name, context, tokens, peak, remat_from, remat_policy="nothing"):
    batch = max(1, tokens // context)
    remat = context >= remat_from and remat_policy != "off"
    model = make(name, context, remat=remat, **({"remat_policy": remat_policy} if remat else {}))
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, context + 1)), jnp.int32)
    step, params, opt, n = lm_train_step(model, tok)

    t0 = time.time()
    compiled = step.lower(params, opt, tok).compile()  # timed once; bench calls the compiled step
    comp = time.time() - t0
    t = bench(lambda: compiled(params, opt, tok), calls=2, repeats=3, warmup=1)
    return {"family": name, "context": context, "batch": batch, "remat": remat and remat_policy, "params_M": n / 1e6, "step_ms": t * 1e3,
            "tokens_per_s": batch * context / t, "MFU": 6 * n * batch * context / t / peak, "compile_s": comp}


def state_sizes(name, prefill, gen, batch):
    """MB of the generation state at 1/4, 1/2 and all of ``prefill`` (shapes only, no device work)."""
    sizes = {}
    for frac in (4, 2, 1):
        ctx = prefill // frac
        m = make(name, ctx + gen + 8)
        sizes[f"state_MB@{ctx}"] = nbytes(jax.eval_shape(lambda m=m: m.initial_state(batch))) / 1e6
    return sizes


def gen_rows(name, prefill, gen, batches, chunk):
    rows = []
    model = make(name, prefill + gen + 8)
    rng = np.random.default_rng(1)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    # LSSL layers: discretise once for generation instead of in every call (other families: unchanged)
    params = jax.jit(lambda v: cache_discretized(model, v, jnp.zeros((1, 1), jnp.int32)))(params)
    apply = jax.jit(model.apply, donate_argnums=(2,))  # the state is updated in place (a KV cache can be tens of GB)
    for batch in batches:
        try:
            rows.append(gen_row(model, params, apply, name, prefill, gen, batch, chunk, rng))
        except Exception as e:  # noqa: BLE001 - one batch size failing (memory) keeps the other's row
            traceback.print_exc()
            rows.append({"family": name, "batch": batch, "prefill": prefill, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    return rows


def gen_row(model, params, apply, name, prefill, gen, batch, chunk, rng):
    """One generation row: chunked prefill (chunks shrink with the batch so a chunk's
    logits stay near ``4 * chunk`` rows of the vocabulary), then ``gen`` timed steps."""
    chunk = max(64, min(chunk, 4 * chunk // batch))
    prompt = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, prefill)), jnp.int32)
    t0 = time.time()
    state = model.initial_state(batch)
    for i in range(0, prefill, chunk):  # chunked prefill: logits of one chunk at a time
        logits, state = apply(params, prompt[:, i : i + chunk], state)
    jax.block_until_ready(logits)
    t_prefill = time.time() - t0
    nxt = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)

    def one(state, nxt):
        y, state = apply(params, nxt, state)
        return state, jnp.argmax(y[:, -1:], -1).astype(jnp.int32)

    state, nxt = one(state, nxt)  # compile
    jax.block_until_ready(nxt)
    t0 = time.time()
    for _ in range(gen):
        state, nxt = one(state, nxt)
    jax.block_until_ready(nxt)
    dt = time.time() - t0
    sizes = state_sizes(name, prefill, gen, batch)
    return {"family": name, "batch": batch, "prefill": prefill, "prefill_chunk": chunk, "prefill_s_incl_compile": t_prefill,
            "gen_tokens_per_s": batch * gen / dt, "ms_per_token_step": dt / gen * 1e3, **sizes}


def set_kernel_config(text: str) -> None:
    """Make ``text`` (comma-separated ``field=number`` of :class:`ChunkedConfig`) the default
    config of ``gated_linear_attention`` and ``delta_rule`` for this process: the layers pass
    ``config=None`` unless built with a ``kernel_config``, and the ops read their module's
    ``DEFAULT_CONFIG`` when they are traced. A benchmark's switch, for A/B rows of one kernel
    choice end to end; library code sets ``kernel_config`` on the layer instead."""
    import importlib

    from linear_attention import parse_config

    config = parse_config(text)
    for name in ("gated_linear_attention", "delta_rule"):  # the packages (the ops' functions shadow their names)
        importlib.import_module(f"mnemax.kernels.{name}").DEFAULT_CONFIG = config
    print(f"kernel config: {config}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default=",".join(f for f in FAMILIES if not f.endswith("-xla")))
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per training step (batch = tokens / context, at least 1)")
    ap.add_argument("--remat_from", type=int, default=16384, help="rematerialise blocks from this context on")
    ap.add_argument("--remat_policy", default="nothing", help="what rematerialised blocks keep (ModelConfig.remat_policy, or 'off': no remat; comma-separated: a row for each)")
    ap.add_argument("--prefill_chunk", type=int, default=2048)
    ap.add_argument("--out", default="throughput.json")
    ap.add_argument("--prefill", type=int, default=16384)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--skip_train", action="store_true")
    ap.add_argument("--skip_gen", action="store_true")
    ap.add_argument("--state_only", action="store_true", help="only the state sizes (shapes; runs anywhere)")
    ap.add_argument("--tiny", action="store_true", help="tiny presets (a dry run on CPU)")
    ap.add_argument("--kernel_config", default=None,
                    help="ChunkedConfig fields for every matrix-state op's Pallas GPU kernels, as "
                         "benchmarks/linear_attention.py's --config (e.g. group_heads=8): the ops' default "
                         "config for this run; the rows record it")
    args = ap.parse_args()
    if args.kernel_config:
        set_kernel_config(args.kernel_config)
    if args.tiny:
        for k, (preset, ov) in list(FAMILIES.items()):
            tiny = _tiny(preset)
            FAMILIES[k] = (tiny, {kk: vv for kk, vv in ov.items() if kk not in ("implementation", "backend")})
    env = environment()
    env["kernel_config"] = args.kernel_config or "default"
    print(env, flush=True)
    if args.state_only:
        rows = [{"family": n, "batch": b, **state_sizes(n, args.prefill, args.gen, b)}
                for n in args.families.split(",") for b in (1, 32)]
        save({"env": env, "state_sizes": rows}, args.out)
        print(table(rows, gen_cols(rows)[:2] + gen_cols(rows)[5:-1]))
        return
    peak = matmul_rate()
    print(f"bf16 matmul: {peak / 1e12:.1f} TFLOP/s", flush=True)
    train, gen = [], []

    def dump():  # after every row, so a run cut short keeps what it measured
        save({"env": env, "matmul_flops": peak, "train": train, "generation": gen}, args.out)

    names = args.families.split(",")
    if not args.skip_train:
        for ctx in map(int, args.contexts.split(",")):
            policies = args.remat_policy.split(",") if ctx >= args.remat_from else ["nothing"]
            for name, policy in itertools.product(names, policies):
                try:
                    train.append(train_row(name, ctx, args.tokens, peak, args.remat_from, policy))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    train.append({"family": name, "context": ctx, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                dump()
                print(table(train, TRAIN_COLS), flush=True)
    if not args.skip_gen:
        for name in names:
            try:
                gen += gen_rows(name, args.prefill, args.gen, (1, 32), args.prefill_chunk)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                gen.append({"family": name, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            dump()
            print(table(gen, gen_cols(gen)), flush=True)
    print("\n" + table(train, TRAIN_COLS) + "\n\n" + table(gen, gen_cols(gen)))


TRAIN_COLS = ["family", "context", "batch", "remat", "params_M", "step_ms", "tokens_per_s", "MFU", "compile_s", "error"]


def gen_cols(rows):
    extra = sorted({k for r in rows for k in r if k.startswith("state_MB@")}, key=lambda k: int(k.split("@")[1]))
    return ["family", "batch", "prefill", "gen_tokens_per_s", "ms_per_token_step", *extra, "error"]


if __name__ == "__main__":
    main()
