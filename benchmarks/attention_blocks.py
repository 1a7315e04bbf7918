"""CausalSelfAttention's query blocks on the accelerator: memory and time of the MQAR
Transformer (configs/mqar.py:transformer: d_model 64, 2 layers, 2 heads, window 128,
key_conv 4, vocab 128) at long sequences, for query_block None (dense) / 128 / 256 / 512,
and of evaluate's streamed step (time_chunk pieces with the state carried).

    python benchmarks/attention_blocks.py [--batch 256] [--time 4096] [--small_batch 16]

Memory: ``temp_size_in_bytes`` of the compiled forward (logits) and of the gradient of a
next-token loss, compiled, never run at the dense size. Time: median forward and gradient
times at ``--batch`` for the blocked variants and at ``--small_batch`` for all (the dense
one included), checked against the dense outputs there. Prints a table last and saves
attention_blocks.json to $OUT.
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

import mnemax  # noqa: E402


def chunk_step(model):
    """evaluate's chunk step (mnemax.train.evaluate.chunk_step, whose module needs TFDS): one
    piece of the sequence with the state carried, scored by a masked cross-entropy sum."""

    @jax.jit
    def step(params, state, piece):
        logits, state = model.apply(params, piece["inputs"], state)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, piece["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * piece["mask"]), state

    return step


def model_for(query_block):
    return mnemax.create("transformer-tiny", d_model=64, n_layers=2, num_heads=2, window=128, key_conv=4,
                         vocab_size=128, query_block=query_block)


def loss_fn(model):
    def loss(params, tokens):
        logits, _ = model.apply(params, tokens)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1))

    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--time", type=int, default=4096)
    ap.add_argument("--small_batch", type=int, default=16)
    args = ap.parse_args()
    env = environment()
    rng = np.random.default_rng(0)
    params = model_for(256).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    big = jnp.asarray(rng.integers(0, 128, (args.batch, args.time)), jnp.int32)
    small = big[: args.small_batch]
    rows, dense_small = [], None
    for qb in (None, 512, 256, 128):
        model = model_for(qb)
        fwd = jax.jit(lambda p, x, m=model: m.apply(p, x)[0])
        grad = jax.jit(jax.grad(loss_fn(model)))
        spec = jax.ShapeDtypeStruct(big.shape, big.dtype)
        row = {"query_block": "dense" if qb is None else qb,
               "fwd_temp_GB": fwd.lower(params, spec).compile().memory_analysis().temp_size_in_bytes / 1e9,
               "grad_temp_GB": grad.lower(params, spec).compile().memory_analysis().temp_size_in_bytes / 1e9}
        out_small = fwd(params, small)
        if qb is None:
            dense_small = out_small
        row["max_diff_vs_dense"] = float(jnp.max(jnp.abs(out_small - dense_small)))
        row[f"fwd_ms_b{args.small_batch}"] = bench(fwd, params, small) * 1e3
        row[f"grad_ms_b{args.small_batch}"] = bench(grad, params, small) * 1e3
        if qb is not None:
            row[f"fwd_ms_b{args.batch}"] = bench(fwd, params, big, calls=3, repeats=5) * 1e3
            row[f"grad_ms_b{args.batch}"] = bench(grad, params, big, calls=3, repeats=5) * 1e3
        rows.append(row)
        print(row, flush=True)
    # evaluate's streamed step: one time_chunk piece with the state carried
    model = model_for(256)
    step = chunk_step(model)
    for chunk in (512, 1024, 4096):
        t = min(chunk, args.time)
        piece = {"inputs": jax.ShapeDtypeStruct((args.batch, t), jnp.int32),
                 "targets": jax.ShapeDtypeStruct((args.batch, t), jnp.int32),
                 "mask": jax.ShapeDtypeStruct((args.batch, t), jnp.float32),
                 "group": jax.ShapeDtypeStruct((args.batch,), jnp.int32)}
        state = jax.eval_shape(lambda p, x: model.apply(p, x)[1], params, piece["inputs"])
        temp = step.lower(params, state, piece).compile().memory_analysis().temp_size_in_bytes / 1e9
        rows.append({"query_block": f"eval step, time_chunk {chunk}", "fwd_temp_GB": temp})
    cols = ["query_block", "fwd_temp_GB", "grad_temp_GB", "max_diff_vs_dense", f"fwd_ms_b{args.small_batch}",
            f"grad_ms_b{args.small_batch}", f"fwd_ms_b{args.batch}", f"grad_ms_b{args.batch}"]
    save({"env": env, "args": vars(args), "rows": rows}, "attention_blocks.json")
    print(env)
    print(table(rows, cols))


if __name__ == "__main__":
    main()
