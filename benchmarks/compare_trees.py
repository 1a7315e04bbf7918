"""Old tree vs new tree, in one run on one device: the no-regression check of a refactor.

    python benchmarks/compare_trees.py --old OLD_SRC [--rounds 2] [--only NAME,...]

``OLD_SRC`` is a source tree of the earlier commit (e.g. ``git archive <commit> | tar -x
-C old``). It and this tree are installed into private folders (``pip install
--no-deps --target``, not editable, so neither shadows the other), and each benchmark
below runs as a subprocess twice per round, once with the old tree's package and its
own copy of the benchmark script, once with this tree's,
alternating the order between rounds so drift (clocks, heat) falls on both. Every run
writes its JSON to ``$OUT/<tree>-<round>-<benchmark>/`` (and a copy beside it); the table last pairs the rows
of the two trees by their identifying fields and prints each timing (the median over
rounds) with the ratio new / old (below 1: faster).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (script, args, output json); the benchmarks issue #33 holds the refactor to
BENCHMARKS = {
    "selective_scan": ("kernels.py", ["--ops", "selective_scan", "--shapes", "{ss_shape}", "--backends", "pallas_gpu"],
                       "kernels.json"),
    "xlstm_kernels": ("kernels_xlstm.py", ["--ops", "mlstm,slstm", "--shapes", "0", "--no_cudnn"], "kernels_xlstm.json"),
    "train_steps": ("models.py", ["--runs", "{train_runs}", "--batch", "8", "--seq", "2048"],
                    "models.json"),
    "generation": ("throughput.py", ["--skip_train", "--families", "mamba,xlstm", "--prefill", "16384", "--gen", "64",
                                     "--out", "throughput.json"], "throughput.json"),
}
KEYS = ("op", "shape", "dtype", "backend", "impl", "chunk", "run", "family", "batch", "prefill", "seq")
TIMES = ("fwd_ms", "fwdbwd_ms", "step_ms", "ms_per_token_step", "gen_tokens_per_s", "tokens_per_s")


def install(src: str, target: str) -> None:
    if not os.path.exists(os.path.join(target, "mnemax")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                        target, src], check=True)


def run_one(tree: str, name: str, out: str, site: str, src: str, fmt: dict) -> float:
    """Runs one benchmark; its JSON lands in ``out`` (and is copied flat, as
    ``<out>.json``, next to it: the device's $OUT returns only shallow files), and its
    timed rows are printed, so a run cut short still reports what it measured."""
    script, args, result = BENCHMARKS[name]
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OUT=out, PYTHONUNBUFFERED="1", PYTHONPATH=site + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path, cwd = os.path.join(src, "benchmarks", script), src
    cmd = [sys.executable, path]
    for a in args:
        cmd += a.format(**fmt).split() if a == "{train_runs}" else [a.format(**fmt)]
    t0 = time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        rc = subprocess.run(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"[{tree}] {name}: rc={rc} in {time.time() - t0:.0f} s  ({' '.join(cmd[1:])})", flush=True)
    if os.path.exists(os.path.join(out, result)):
        shutil.copy(os.path.join(out, result), out.rstrip(os.sep) + ".json")
    for r in rows_of(os.path.join(out, result)):
        print(f"  [{tree}] {name}: " + ", ".join(f"{k}={v}" for k, v in key(r))
              + "  " + ", ".join(f"{t}={r[t]:.5g}" for t in TIMES if isinstance(r.get(t), int | float)), flush=True)
    return rc


def rows_of(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    doc = json.load(open(path))
    rows = list(doc.get("rows", [])) + list(doc.get("train", [])) + list(doc.get("generation", []))
    return [r for r in rows if "error" not in r]


def key(row: dict) -> tuple:
    return tuple((k, str(row[k])) for k in KEYS if k in row)


def compare(out_root: str, names: list[str]) -> list[dict]:
    table = []
    for name in names:
        per_tree: dict[str, dict[tuple, dict[str, list[float]]]] = {}
        for tree in ("old", "new"):
            for path in glob.glob(os.path.join(out_root, f"{tree}-*-{name}", BENCHMARKS[name][2])):
                for r in rows_of(path):
                    slot = per_tree.setdefault(tree, {}).setdefault(key(r), {})
                    for t in TIMES:
                        if isinstance(r.get(t), int | float):
                            slot.setdefault(t, []).append(float(r[t]))
        old, new = per_tree.get("old", {}), per_tree.get("new", {})
        for k in sorted(set(old) & set(new)):
            for t in TIMES:
                if t in old[k] and t in new[k]:
                    a, b = statistics.median(old[k][t]), statistics.median(new[k][t])
                    table.append({"benchmark": name, "row": ", ".join(f"{x}={v}" for x, v in k), "metric": t,
                                  "old": a, "new": b, "new/old": b / a, "n": f"{len(old[k][t])}/{len(new[k][t])}"})
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="source tree of the earlier commit")
    ap.add_argument("--sites", default="/tmp/mnemax_sites", help="where the two trees are installed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=",".join(BENCHMARKS))
    ap.add_argument("--ss_shape", default="0,1", help="kernels.py --shapes: (8, 2048, 1536, 16) in f32 and bf16")
    ap.add_argument("--train_runs", default="mamba-130m:scan_layers=True xlstm-125m", help="models.py --runs, space-separated")
    args = ap.parse_args()
    out_root = os.environ.get("OUT") or "compare_out"
    names = [n for n in args.only.split(",") if n]
    src = {"old": os.path.abspath(args.old), "new": ROOT}
    site = {tree: os.path.join(args.sites, tree) for tree in src}
    for tree in src:
        install(src[tree], site[tree])
    fmt = {"ss_shape": args.ss_shape, "train_runs": args.train_runs}
    for rnd in range(args.rounds):
        for name in names:
            order = ("old", "new") if rnd % 2 == 0 else ("new", "old")
            for tree in order:
                run_one(tree, name, os.path.join(out_root, f"{tree}-{rnd}-{name}"), site[tree], src[tree], fmt)
    table = compare(out_root, names)
    with open(os.path.join(out_root, "compare.json"), "w") as f:
        json.dump(table, f, indent=2)
    cols = ["benchmark", "row", "metric", "old", "new", "new/old", "n"]
    print(" | ".join(cols))
    for r in table:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
