"""Where a training step's device time goes: a profiler trace of one family's jitted AdamW step.

    python benchmarks/profile_step.py --family mamba2 --context 2048 [--tokens 16384] [--top 25]

Builds the step exactly as ``benchmarks/throughput.py`` does (same presets, batch = tokens /
context, blocks rematerialised from ``--remat_from`` on), runs it ``--steps`` times under
``jax.profiler.trace``, reads the trace back (``jax.profiler.ProfileData``) and prints, per
step, the device time of the heaviest GPU kernels (by kernel name) and of the heaviest
operations by their JAX name stack (the layer and the op that emitted them), with their share
of the step. The JSON (``--out``) holds both lists. On a machine without a GPU it reads the
host's XLA thunk lines instead (a dry run of the script, not a measurement).

XLA's command buffers (CUDA graphs) are off while profiling (``--command_buffers`` keeps them):
inside one, every kernel's name stack reads ``XlaModule:`` and the scope table says nothing
(the first run, 2026-12-07). Without them the step pays its kernel launches, so its total can
exceed the timed step of ``benchmarks/throughput.py`` a little.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

if __name__ == "__main__" and "--command_buffers" not in sys.argv:  # before JAX reads XLA_FLAGS
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, lm_train_step, save, table  # noqa: E402
from throughput import FAMILIES, make  # noqa: E402


def _stats(event) -> dict:
    try:
        return dict(event.stats)
    except (TypeError, ValueError):
        return {}


def _scope(name: str) -> str:
    """A name stack without transform wrappers and instance numbers, e.g.
    ``Mamba2Mixer/conv1d/conv_general_dilated`` from
    ``jit(step)/jvp(Model)/blocks/Mamba2Block_0/Mamba2Mixer_0/conv1d/conv_general_dilated``."""
    parts = [p for p in name.split("/") if p and not re.match(r"^(jit|jvp|transpose|vmap|remat|checkpoint|while|body|cond)\b", p)]
    parts = [re.sub(r"_\d+$", "", re.sub(r"\(.*\)$", "", p)) for p in parts]
    return "/".join(parts[-3:])


def device_events(xplane_path: str):
    """(kernel name, name stack, duration ns) of every device event in the trace: the GPU
    planes' stream lines, or, with no GPU plane, the host's XLA thunk lines."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if planes:
        lines = [(p, ln) for p in planes for ln in p.lines if ln.name.startswith("Stream")]
    else:
        lines = [(p, ln) for p in data.planes if p.name == "/host:CPU" for ln in p.lines if ln.name.startswith("tf_XLA")]
    shown = False
    for _, line in lines:
        for ev in line.events:
            st = _stats(ev)
            if not shown:  # the stats this jaxlib's trace carries (for reading the scope table)
                print("first device event's stats:", {k: str(v)[:80] for k, v in st.items()}, flush=True)
                shown = True
            stack = str(st.get("tf_op") or st.get("long_name") or st.get("hlo_op") or ev.name)
            yield ev.name, stack, float(ev.duration_ns)


def profile(name, context, tokens, remat_from, steps, top):
    batch = max(1, tokens // context)
    model = make(name, context, remat=context >= remat_from)
    rng = np.random.default_rng(0)
    tok = jax.numpy.asarray(rng.integers(0, model.config.vocab_size, (batch, context + 1)), jax.numpy.int32)
    step, params, opt, _ = lm_train_step(model, tok)
    compiled = step.lower(params, opt, tok).compile()
    for _ in range(2):
        jax.block_until_ready(compiled(params, opt, tok))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(steps):
            jax.block_until_ready(compiled(params, opt, tok))
    path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    by_kernel, by_scope = collections.Counter(), collections.Counter()
    for kernel, stack, ns in device_events(path):
        by_kernel[kernel[:90]] += ns
        by_scope[_scope(stack)[:110]] += ns
    total = sum(by_kernel.values())

    def rows(counter, key):
        return [{key: k, "ms_per_step": v / steps / 1e6, "share": v / total} for k, v in counter.most_common(top)]

    head = {"family": name, "context": context, "batch": batch, "device_ms_per_step": total / steps / 1e6}
    return head, rows(by_kernel, "kernel"), rows(by_scope, "scope")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens / context, at least 1)")
    ap.add_argument("--remat_from", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="profile_step.json")
    ap.add_argument("--command_buffers", action="store_true",
                    help="keep XLA's command buffers (their kernels lose their name stacks in the trace)")
    a = ap.parse_args()
    if a.context < 1 or a.tokens < 1 or a.steps < 1 or a.top < 1:
        ap.error(f"--context, --tokens, --steps and --top must be >= 1, got {a.context}, {a.tokens}, {a.steps}, {a.top}")
    env = environment()
    print(env, flush=True)
    head, kernels, scopes = profile(a.family, a.context, a.tokens, a.remat_from, a.steps, a.top)
    print(head, flush=True)
    print(table(kernels, ["kernel", "ms_per_step", "share"]))
    print(table(scopes, ["scope", "ms_per_step", "share"]))
    save({"env": env, **head, "kernels": kernels, "scopes": scopes}, a.out)


if __name__ == "__main__":
    main()
