"""The side-by-side memory benchmark: every family, the same tasks, matched budgets.

    mnemax-bench memory --budget tiny [--smoke] [--families ...] [--out benchmarks]
    python benchmarks/memory_tasks.py ...            (the same)

For each family, each task and each difficulty it trains a model sized to the
parameter budget (``d_model`` searched so that the count is as close as possible to
the budget's target) with fixed seeds, evaluates it on held-out data, and writes a
table (accuracy per family x task x difficulty) as markdown and JSON, plus plots of
accuracy against the difficulty axis (number of key-value pairs, context length).

Passkey is trained at one length and evaluated at 1x, 2x and 4x that length (and by
needle depth); families with a bounded context (a Transformer's attention window)
see only the window, which is the point of the comparison.

``--smoke`` runs a few steps per cell, on every family's first cell and on one cell
of every task (CI checks that the table is produced, not the accuracies).

A long table can be split: run disjoint ``--families`` (on separate accelerators, e.g.
with ``CUDA_VISIBLE_DEVICES``) into separate ``--out`` folders, then
``mnemax-bench memory --merge A/memory_10m.json B/memory_10m.json --out benchmarks``
writes the one table and plots. ``--steps`` overrides the budget's training steps.
``--parallel N`` runs the cells as N concurrent processes on one machine (at the 10m budget
an H100 finished the most cells per minute with 4-6 of them; 12 filled its memory and
finished fewer). ``--skip_done JSON`` trains only the cells an earlier table lacks and
writes the table of both, so an interrupted or partial run is finished with one command:
``mnemax-bench memory --budget 10m --steps 2000 --learning_rate 1e-3 --parallel 4
--tasks mqar selective_copying --skip_done benchmarks/memory_10m_2000steps.json --out benchmarks``
(a passkey row counts as done only if it was evaluated at every ``--passkey_eval`` length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np

import mnemax
from mnemax.configs.base import base_config

from . import tasks as tasks_lib
from .data import Feeder
from .trainer import Trainer, accumulate_eval

# family label -> (preset, fixed overrides). Families appear here once they exist.
FAMILIES: dict[str, tuple[str, dict]] = {
    "transformer": ("transformer-tiny", {"num_heads": 2}),
    "transformer+keyconv": ("transformer-tiny", {"num_heads": 2, "key_conv": 4}),
    "mamba": ("mamba-tiny", {}),
    "s4d": ("s4d-tiny", {}),
    "lssl": ("lssl-tiny", {}),
    "hopfield": ("hopfield-tiny", {}),
    "hopfield+keyconv": ("hopfield-tiny", {"key_conv": 4}),  # stored patterns see the 3 steps before
    # chunks of 16 steps (the layer's default; the tiny preset's 4); the number of chunks is
    # set per cell by sized_overrides so that the memory holds the whole episode, as in the paper
    "hcam": ("hcam-tiny", {"chunk_size": 16}),
}
OPTIONAL_FAMILIES = {
    "mlstm": ("mlstm-tiny", {}),
    "slstm": ("slstm-tiny", {}),
    "xlstm": ("xlstm-tiny", {}),
    "memmamba": ("memmamba-tiny", {}),
    # the plain ELM neuron (every input on its own synapse), memory units = d_model so the
    # budget sizes it; elm-tiny is a Branch-ELM of 3 x 3 synapses, which saw 9 of a task's inputs
    "elm": ("elm-small", {"num_memory": None}),
}

# Overrides of the long budgets (10m, 125m) on top of a family's fixed ones. The tiny presets'
# 2 heads and 16-step chunks, scaled to d_model 768, give the mLSTM 768 x 768 matrix states
# per head, and the xla chunkwise form keeps a (batch, heads, chunks, d_qk, d_v) stack of them
# (and its associative scan's levels): the 10m MQAR train step asked the H100 for 50 GiB
# (CPU compile: 106 GB of temporaries). 4 heads and 64-step chunks, as in xlstm-125m, give
# 384-wide heads and a quarter of the chunks (22 GB).
LONG_BUDGET_OVERRIDES: dict[str, dict] = {
    "mlstm": {"num_heads": 4, "chunk_size": 64},
    "xlstm": {"num_heads": 4, "chunk_size": 64},
}

# The peak learning rate of every cell (AdamW, warmup, cosine; ``--learning_rate`` overrides it).
# At the 10m budget with 3e-3 (H100, 2,000 steps, MQAR) mamba stayed at chance and one mLSTM
# cell ended with NaN parameters, while attention and Hopfield with a key conv solved it; at
# 1e-3 the 10m mLSTM solves 16 and 64 pairs (benchmarks/RESULTS.md), so the 10m runs there
# pass --learning_rate 1e-3.
DEFAULT_LR = 3e-3

BUDGETS = {  # target parameter counts, training steps, batch
    "tiny": {"params": 60_000, "steps": 400, "batch": 32, "layers": 2},
    "10m": {"params": 10_000_000, "steps": 4000, "batch": 64, "layers": 4},
    "125m": {"params": 125_000_000, "steps": 10000, "batch": 64, "layers": 12},
}


def family_overrides(family: str, fixed: dict, budget: str) -> dict:
    """A family's fixed overrides at ``budget``: ``fixed`` plus, on the long budgets,
    :data:`LONG_BUDGET_OVERRIDES`."""
    if budget not in BUDGETS:
        raise ValueError(f"budget: got {budget!r}, expected one of {sorted(BUDGETS)}")
    return dict(fixed) if budget == "tiny" else {**fixed, **LONG_BUDGET_OVERRIDES.get(family, {})}


@dataclasses.dataclass
class Cell:
    task: str
    difficulty: str
    params: dict
    eval_lengths: tuple = ()


def cells(budget: str, passkey_len: int | None = None, passkey_eval: tuple = (1, 2, 4)) -> list[Cell]:
    """The budget's cells. ``passkey_len``: train passkey at this length instead of the
    budget's (256 at 10m / 125m, 64 at tiny). ``passkey_eval``: the multiples of that
    length passkey is evaluated at (default 1x, 2x and 4x); memories with a capacity are
    sized to the longest (:func:`sized_overrides`)."""
    long = budget != "tiny"
    mqar_len = 256 if long else 64
    if passkey_len is not None and (not isinstance(passkey_len, int) or passkey_len < 16):
        raise ValueError(f"passkey_len: got {passkey_len!r}, expected an integer >= 16")
    mults = tuple(passkey_eval)
    if not mults or any(not isinstance(m, int) or m < 1 for m in mults) or len(set(mults)) != len(mults):
        raise ValueError(f"passkey_eval: got {passkey_eval!r}, expected distinct integers >= 1 (multiples of the training length)")
    pk_len = passkey_len or (256 if long else 64)
    return [
        # MQAR draws keys from half the vocabulary: 256 holds the 64 pairs of the long budgets
        *[Cell("mqar", f"pairs={p}", {"seq_len": mqar_len, "num_pairs": p, "vocab_size": 256 if long else 64})
          for p in ((8, 16, 32, 64) if long else (4, 8, 16))],
        Cell("passkey", f"len={pk_len}", {"seq_len": pk_len, "key_len": 4}, eval_lengths=tuple(m * pk_len for m in sorted(mults))),
        *[Cell("selective_copying", f"tokens={k}", {"seq_len": 128 if long else 48, "num_tokens": k, "data_vocab": 8})
          for k in ((8, 16) if long else (4, 8))],
        Cell("recall", "dancers=4", {"seq_len": 160 if long else 96, "num_dancers": 4}),
        Cell("spiking_adding", "bins=30", {"num_channels": 16, "bins_per_digit": 30}),
    ]


def available_families(selected=None) -> dict:
    fams = dict(FAMILIES)
    for k, v in OPTIONAL_FAMILIES.items():
        if v[0] in mnemax.list_models():
            fams[k] = v
    if selected:
        unknown = sorted(set(selected) - set(fams))
        if unknown:
            raise ValueError(f"--families: unknown {unknown}; available {sorted(fams)}")
        fams = {k: fams[k] for k in selected}
    return fams


_PARAM_COUNTS: dict[str, int | None] = {}


def _count_params(preset: str, overrides: dict) -> int | None:
    """The parameter count of ``preset`` with ``overrides`` (None: a size the preset
    refuses), traced once per distinct configuration (the cells of a budget share most)."""
    key = repr((preset, sorted(overrides.items())))
    if key not in _PARAM_COUNTS:
        try:
            cfg = mnemax.get_config(preset, **overrides)
            _PARAM_COUNTS[key] = mnemax.release.count_params(mnemax.release.abstract_params(mnemax.build(cfg)))
        except (ValueError, TypeError):
            _PARAM_COUNTS[key] = None
    return _PARAM_COUNTS[key]


def sized_overrides(preset: str, fixed: dict, spec: tasks_lib.TaskSpec, target: int, layers: int,
                    span: int | None = None) -> tuple[dict, int]:
    """Overrides (d_model and fixed ones) whose parameter count is closest to ``target``.
    ``span``: the longest context the model is evaluated at (default 4x the task's length)."""
    best = None
    span = span or 4 * spec.seq_len
    for d in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048):
        ov = {**fixed, "d_model": d, **spec.model_overrides()}
        if "n_layers" in mnemax.get_config(preset).to_dict() and mnemax.get_config(preset).n_layers > 1:
            ov["n_layers"] = layers
        # Memories with a capacity cover the longest evaluated context (passkey at 4x), so a
        # family is not cut off by a preset's small window: attention's window, the causal
        # Hopfield ring buffer (hopfield-tiny kept 32 steps), HCAM's chunks (8 of 4 steps).
        block = mnemax.get_config(preset).block
        if "window" in block:
            ov["window"] = span
        if "memory_size" in block:
            ov["memory_size"] = span
        if "num_chunks" in block:
            ov["num_chunks"] = -(-span // ov.get("chunk_size", block["chunk_size"]))
        n = _count_params(preset, ov)
        if n is None:
            continue
        if best is None or abs(np.log(n / target)) < abs(np.log(best[1] / target)):
            best = (ov, n)
    if best is None:
        raise ValueError(f"no size of {preset!r} fits the task {spec.name!r}")
    return best


def run_cell(family: str, preset: str, fixed: dict, cell: Cell, budget: dict, workdir: str, data_dir: str,
             smoke: bool, seed: int = 0) -> dict:
    task = tasks_lib.make_task(cell.task, **cell.params)
    spec = task.spec()
    span = max(cell.eval_lengths) if cell.eval_lengths else None
    overrides, n_params = sized_overrides(preset, fixed, spec, budget["params"], budget["layers"], span=span)
    c = base_config()
    c.seed = seed
    c.model.preset = preset
    c.model.overrides = {k: v for k, v in overrides.items() if k not in spec.model_overrides()}
    c.task.name = cell.task
    c.task.params = cell.params
    c.task.num_train = 64 if smoke else 20000
    c.task.num_test = 32 if smoke else 1000
    c.task.seed = seed
    c.task.data_dir = data_dir
    c.train.steps = 3 if smoke else budget["steps"]
    c.train.batch_size = 8 if smoke else budget["batch"]
    c.train.warmup_steps = 1 if smoke else min(100, budget["steps"] // 10)
    c.train.learning_rate = budget.get("lr", DEFAULT_LR)
    c.eval.every_steps = 0
    c.eval.batch_size = 32
    c.checkpoint.every_steps = 0
    c.log.progress_bar = False
    c.log.console = False
    c.log.tensorboard = False
    c.release.write = False
    c.mesh.num_devices = 1
    t0 = time.time()
    trainer = Trainer(c, workdir)
    result = trainer.run()
    row = {
        "family": family, "preset": preset, "task": cell.task, "difficulty": cell.difficulty,
        "params": n_params, "d_model": overrides["d_model"], "steps": c.train.steps, "lr": c.train.learning_rate,
        "accuracy": result["eval_accuracy"], "loss": result["eval_loss"], "seconds": time.time() - t0, "seed": seed,
    }
    for k, v in result.items():
        if k.startswith("eval_accuracy/"):
            row[k.replace("eval_accuracy/", "acc ")] = v
    if cell.eval_lengths:
        from .checkpoint import Checkpointer

        ck = Checkpointer(os.path.join(workdir, "checkpoints"), use_async=False)
        restored = ck.restore_latest(trainer.abstract_state)
        ck.close()
        params = restored[1].params if restored else None
        for length in cell.eval_lengths:
            if params is None:
                break
            long_params = {**cell.params, "seq_len": length}
            src = tasks_lib.open_task(cell.task, long_params, num_train=1, num_test=c.task.num_test, seed=seed, data_dir=data_dir)
            feeder = Feeder(src, trainer.mesh, batch_size=c.eval.batch_size, seed=0)
            model = trainer.model

            @jax.jit
            def step(p, batch):
                from .trainer import masked_metrics

                logits, _ = model.apply({"params": p}, batch["inputs"])
                return masked_metrics(logits, batch["targets"], batch["mask"], batch["group"], len(src.spec().group_names))

            out = accumulate_eval(lambda b: step(params, b), feeder.eval_batches(c.eval.batch_size), src.spec().group_names)
            row[f"acc len={length}"] = out["eval_accuracy"]
    return row


def _natural(key):
    task, diff = key
    name, _, num = diff.partition("=")
    return (task, name, int(num) if num.isdigit() else num)


def _label(row: dict, rows: list[dict]) -> str:
    """A row's family, with its learning rate when the rows were trained at several."""
    if len({r.get("lr", DEFAULT_LR) for r in rows}) > 1:  # rows from before "lr" was recorded ran at the default
        return f"{row['family']} (lr {row.get('lr', DEFAULT_LR):g})"
    return row["family"]


def _by_cell(rows: list[dict]) -> dict:
    """(label, task, difficulty) -> that cell's rows, one per seed."""
    out: dict = {}
    for r in rows:
        out.setdefault((_label(r, rows), r["task"], r["difficulty"]), []).append(r)
    return out


def _stat(rs: list[dict], key: str = "accuracy") -> tuple[float, float, float]:
    """(mean, min, max) of ``key`` over a cell's seeds."""
    v = np.array([r.get(key, np.nan) for r in rs], float)
    return float(np.mean(v)), float(np.min(v)), float(np.max(v))


def _fmt(rs: list[dict], key: str = "accuracy") -> str:
    """One seed: the value; several: ``mean (min-max)``."""
    mean, lo, hi = _stat(rs, key)
    if np.isnan([lo, hi]).all():  # not measured in this cell (e.g. a length only some rows were evaluated at)
        return "-"
    return f"{mean:.3f}" if len(rs) == 1 else f"{mean:.3f} ({lo:.3f}-{hi:.3f})"


def markdown(rows: list[dict]) -> str:
    """The accuracy table: a row per family (per family and learning rate when the rows
    hold several rates), a column per (task, difficulty). A cell run with several seeds
    shows the mean accuracy and, in brackets, the lowest and highest."""
    cols = sorted({(r["task"], r["difficulty"]) for r in rows}, key=_natural)
    fams = list(dict.fromkeys(_label(r, rows) for r in rows))
    cells_of = _by_cell(rows)
    seeds = sorted({len(v) for v in cells_of.values()})
    head = "| family | params | " + " | ".join(f"{t} {d}" for t, d in cols) + " |"
    sep = "| --- | --- | " + " | ".join("---" for _ in cols) + " |"
    lines = [head, sep]
    for f in fams:
        mine = {(t, d): v for (lab, t, d), v in cells_of.items() if lab == f}
        params = sorted({r["params"] for v in mine.values() for r in v})
        cells_ = [_fmt(mine[c]) if c in mine else "-" for c in cols]
        lines.append(f"| {f} | {params[0]:,}-{params[-1]:,} | " + " | ".join(cells_) + " |")
    if seeds != [1]:
        n = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]} to {seeds[-1]} seeds"
        lines += ["", f"Each cell: the mean accuracy over its {n} and, in brackets, the lowest and highest."]
    extra = [k for k, v in cells_of.items() if any(key.startswith("acc len=") for r in v for key in r)]
    if extra:
        keys = {key for k in extra for r in cells_of[k] for key in r}
        lens = sorted((k for k in keys if k.startswith("acc len=")), key=lambda k: int(k.split("=")[1]))
        depths = sorted(k for k in keys if k.startswith("acc depth"))
        lines += ["", "Passkey, trained at the first length: accuracy by evaluation length and by needle depth (training length)", "",
                  "| family | " + " | ".join(lens + depths) + " |", "| --- | " + " | ".join("---" for _ in lens + depths) + " |"]
        for k in extra:
            lines.append(f"| {k[0]} | " + " | ".join(_fmt(cells_of[k], key) for key in lens + depths) + " |")
    return "\n".join(lines)


def plots(rows: list[dict], out_dir: str, suffix: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    # 12+ families: 20 colours and alternating line styles, so no two share a look
    from cycler import cycler

    plt.rcParams["axes.prop_cycle"] = (cycler(linestyle=["-", "--"]) * cycler(color=plt.get_cmap("tab20").colors[::2]))[:20]
    paths = []
    mq = [r for r in rows if r["task"] == "mqar"]
    if mq:
        fig, ax = plt.subplots(figsize=(6, 4))
        cells_of = _by_cell(mq)
        for f in dict.fromkeys(_label(r, mq) for r in mq):
            pts = sorted((int(d.split("=")[1]), *_stat(v)) for (lab, _, d), v in cells_of.items() if lab == f)
            x, mean, lo, hi = zip(*pts)
            (line,) = ax.plot(x, mean, marker="o", label=f)
            if any(len(v) > 1 for (lab, _, _), v in cells_of.items() if lab == f):  # several seeds: their range
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set(xlabel="key-value pairs", ylabel="held-out recall accuracy", title="MQAR", xscale="log", ylim=(0, 1.02))
        pairs = sorted({int(r["difficulty"].split("=")[1]) for r in mq})
        ax.set_xticks(pairs, [str(p) for p in pairs])
        ax.minorticks_off()
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        p = os.path.join(out_dir, f"mqar_accuracy_vs_pairs{suffix}.png")
        fig.savefig(p, dpi=120, bbox_inches="tight")
        paths.append(p)
    pk = [r for r in rows if r["task"] == "passkey"]
    if pk:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (label, _, _), rs in _by_cell(pk).items():  # the mean over seeds
            keys = sorted({k for r in rs for k in r if k.startswith("acc len=")}, key=lambda k: int(k.split("=")[1]))
            if keys:
                ax.plot([int(k.split("=")[1]) for k in keys], [_stat(rs, k)[0] for k in keys], marker="o", label=label)
        ax.set(xlabel="context length (trained at the first point)", ylabel="passkey accuracy", xscale="log", ylim=(0, 1.02))
        lengths = sorted({int(k.split("=")[1]) for r in pk for k in r if k.startswith("acc len=")})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        p = os.path.join(out_dir, f"passkey_accuracy_vs_length{suffix}.png")
        fig.savefig(p, dpi=120, bbox_inches="tight")
        paths.append(p)
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="mnemax-bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="tiny", choices=sorted(BUDGETS))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--families", nargs="*")
    ap.add_argument("--tasks", nargs="*")
    ap.add_argument("--difficulties", nargs="*", help="only these cells, as the table names them (e.g. pairs=16)")
    ap.add_argument("--passkey_len", type=int, default=None,
                    help="train passkey at this length (default: the budget's), evaluated at the --passkey_eval multiples of it")
    ap.add_argument("--passkey_eval", nargs="+", type=int, default=[1, 2, 4], metavar="MULT",
                    help="evaluate passkey at these multiples of its training length (default 1 2 4)")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps per cell (default: the budget's)")
    ap.add_argument("--learning_rate", type=float, default=None, help=f"peak learning rate of every cell (default {DEFAULT_LR})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="train every cell once per seed (model init and data); the table shows the mean and range")
    ap.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="run the cells as N concurrent processes sharing this machine's accelerator (at the 10m "
                         "budget 4-6 finished the most cells per minute on an H100; 12 filled its memory)")
    ap.add_argument("--skip_done", nargs="+", default=None, metavar="JSON",
                    help="earlier outputs of this budget and --steps: their cells at this rate and seed are not "
                         "trained again, and their rows are written into the new table with the new ones")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine earlier outputs' rows into one table and plots in --out; trains nothing")
    args = ap.parse_args(argv)
    if args.merge:
        docs = []
        for path in args.merge:
            with open(path) as f:
                docs.append(json.load(f))
        budgets = {(d["budget"], d.get("steps")) for d in docs}
        if len(budgets) != 1:
            raise ValueError(f"--merge: the files come from different budgets or --steps {sorted(budgets, key=str)}; expected one")
        rows = [r for d in docs for r in d["rows"]]
        # the devices and dates the rows were measured on, not the merging machine's
        return write(rows, docs[0]["budget"], any(d["smoke"] for d in docs), args.out, steps=docs[0].get("steps"),
                     device=", ".join(sorted({d["device"] for d in docs})), date=max(d["date"] for d in docs),
                     merged_from=[os.path.abspath(p) for p in args.merge])
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds: got {args.seeds}; expected distinct integers >= 0")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.parallel < 1:
        raise ValueError(f"--parallel: got {args.parallel}, expected an integer >= 1")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    budget = dict(BUDGETS[args.budget], **({"steps": args.steps} if args.steps else {}))
    if args.learning_rate is not None:
        budget["lr"] = args.learning_rate
    lr_tag = f"-lr{args.learning_rate:g}" if args.learning_rate is not None else ""
    fams = available_families(args.families)
    todo = [c for c in cells(args.budget, args.passkey_len, tuple(args.passkey_eval)) if not args.tasks or c.task in args.tasks]
    if args.difficulties:
        known = {c.difficulty for c in todo}
        if set(args.difficulties) - known:
            raise ValueError(f"--difficulties: unknown {sorted(set(args.difficulties) - known)}; the cells have {sorted(known)}")
        todo = [c for c in todo if c.difficulty in args.difficulties]
    plan = [(f, c) for f in fams for c in todo]
    if args.smoke and not args.tasks:
        # smoke: every family on the first cell, the first family on one cell of every task
        first_of_task = list({c.task: c for c in reversed(todo)}.values())[::-1]
        plan = [(f, todo[0]) for f in fams] + [(next(iter(fams)), c) for c in first_of_task if c is not todo[0]]
    jobs = [(fam, cell, seed) for (fam, cell) in plan for seed in args.seeds]
    kept, extra = [], {}
    if args.skip_done:
        lr = budget.get("lr", DEFAULT_LR)
        kept, docs = _done_rows(args.skip_done, args.budget, args.steps, args.smoke)
        key = lambda r: (r["family"], r["task"], r["difficulty"], r.get("seed", 0))  # noqa: E731
        done = {key(r): r for r in kept if r.get("lr") == lr}

        def is_done(f, c, s):  # a passkey row counts only if it was evaluated at every length asked for now
            r = done.get((f, c.task, c.difficulty, s))
            return r is not None and all(f"acc len={n}" in r for n in c.eval_lengths)

        jobs = [(f, c, s) for f, c, s in jobs if not is_done(f, c, s)]
        stale = {(f, c.task, c.difficulty, s) for f, c, s in jobs}
        kept = [r for r in kept if key(r) not in stale or r.get("lr") != lr]
        print(f"--skip_done: {len(kept)} rows kept, {len(jobs)} cells to train", flush=True)
        extra = {"merged_from": [m for d in docs for m in d.get("merged_from", [])] + [os.path.abspath(p) for p in args.skip_done],
                 "device": ", ".join(sorted({d["device"] for d in docs} | ({_this_device()} if jobs else set())))}
    import tempfile

    work = args.workdir or tempfile.mkdtemp(prefix="mnemax-bench-")
    data_dir = args.data_dir or os.path.join(work, "data")
    if args.parallel > 1:
        return write(kept + _run_parallel(jobs, args, work), args.budget, args.smoke, args.out, steps=args.steps, **extra)
    rows = list(kept)
    for fam, cell, seed in jobs:
        preset, fixed = fams[fam]
        fixed = family_overrides(fam, fixed, args.budget)
        # one directory per run: a reused --workdir must not resume another budget's, --steps',
        # rate's or seed's checkpoint (the trainer resumes a workdir's newest checkpoint)
        seed_tag = f"-seed{seed}" if seed else ""
        wd = os.path.join(work, f"{args.budget}-{budget['steps']}steps{lr_tag}{'-smoke' if args.smoke else ''}-{fam}-{cell.task}-{cell.difficulty}{seed_tag}".replace("=", ""))
        try:
            row = run_cell(fam, preset, fixed, cell, budget, wd, data_dir, args.smoke, seed=seed)
        except Exception as err:  # noqa: BLE001 - a family that cannot take a task is reported, not fatal
            row = _error_row(fam, preset, cell, seed, f"{type(err).__name__}: {str(err)[:200]}")
        rows.append(row)
        _print_row(row)
    return write(rows, args.budget, args.smoke, args.out, steps=args.steps, **extra)


def _this_device() -> str:
    return f"{jax.devices()[0]} ({jax.devices()[0].device_kind})"


def _done_rows(paths: list[str], budget: str, steps: int | None, smoke: bool) -> tuple[list[dict], list[dict]]:
    """The error-free rows of the earlier outputs ``paths`` (``--skip_done``), and their
    documents; each must come from this ``budget``, ``--steps`` and smoke setting."""
    docs, rows = [], []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"--skip_done: {path!r} does not exist; expected an earlier memory_<budget>*.json")
        with open(path) as f:
            doc = json.load(f)
        got = (doc.get("budget"), doc.get("steps"), bool(doc.get("smoke")))
        if got != (budget, steps, smoke):
            raise ValueError(f"--skip_done: {path!r} has (budget, steps, smoke) {got}; expected {(budget, steps, smoke)} "
                             "as in this run")
        docs.append(doc)
        rows += [r for r in doc["rows"] if "error" not in r]
    return rows, docs


def _error_row(fam: str, preset: str, cell: Cell, seed: int, error: str) -> dict:
    """The row of a cell that failed: reported in the JSON, left out of the table."""
    return {"family": fam, "preset": preset, "task": cell.task, "difficulty": cell.difficulty, "params": 0,
            "accuracy": float("nan"), "seed": seed, "error": error}


def _print_row(row: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def _run_parallel(jobs, args, work: str) -> list[dict]:
    """Each (family, cell, seed) of ``jobs`` as its own ``python -m mnemax.train.bench_memory``
    process, ``args.parallel`` at a time, in order; their rows in that order. Each process
    has its own data directory (two processes building one TFDS dataset would race), logs to
    ``<work>/logs/<cell>.log`` and, on the GPU, allocates memory as it needs it rather than
    preallocating most of the device."""
    import subprocess
    import sys

    common = ["--budget", args.budget, "--workdir", work, "--passkey_eval", *map(str, args.passkey_eval)]
    for flag, value in (("--steps", args.steps), ("--learning_rate", args.learning_rate), ("--passkey_len", args.passkey_len)):
        if value is not None:
            common += [flag, str(value)]
    if args.smoke:
        common.append("--smoke")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    rows: list = [None] * len(jobs)
    running: dict = {}
    pending = list(range(len(jobs)))
    while pending or running:
        while pending and len(running) < args.parallel:
            i = pending.pop(0)
            fam, cell, seed = jobs[i]
            name = f"{i:03d}-{fam}-{cell.task}-{cell.difficulty}-seed{seed}".replace("=", "").replace("+", "_")
            data_dir = os.path.join(args.data_dir or os.path.join(work, "data"), name)
            cmd = [sys.executable, "-m", "mnemax.train.bench_memory", *common, "--families", fam, "--tasks", cell.task,
                   "--difficulties", cell.difficulty, "--seeds", str(seed), "--out", os.path.join(work, "cells", name),
                   "--data_dir", data_dir]
            log = open(os.path.join(work, "logs", f"{name}.log"), "w")
            running[i] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, name)
        for i, (proc, log, name) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[i]
            fam, cell, seed = jobs[i]
            out_dir = os.path.join(work, "cells", name)
            found = [f for f in sorted(os.listdir(out_dir)) if f.endswith(".json")] if os.path.isdir(out_dir) else []
            if proc.returncode == 0 and found:
                with open(os.path.join(out_dir, found[0])) as f:
                    rows[i] = json.load(f)["rows"][0]
            else:
                with open(os.path.join(work, "logs", f"{name}.log")) as f:
                    tail = f.read()[-300:]
                rows[i] = _error_row(fam, available_families([fam])[fam][0], cell, seed,
                                     f"process exited with {proc.returncode}: {tail}")
            _print_row(rows[i])
        if running:
            time.sleep(0.5)
    return rows


def write(rows: list[dict], budget: str, smoke: bool, out: str, steps: int | None = None, device: str | None = None,
          date: str | None = None, **extra) -> dict:
    """``memory_<budget>[_<steps>steps][_smoke].json`` / ``.md`` and the plots under
    ``out/plots`` (``steps``: the ``--steps`` override, if any, names the files and plots so
    that a longer run does not overwrite the budget's own table). ``device`` / ``date``: where
    and when the rows were measured (default: this process's first device, today)."""
    os.makedirs(out, exist_ok=True)
    tag = f"memory_{budget}{f'_{steps}steps' if steps else ''}{'_smoke' if smoke else ''}"
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump({"budget": budget, "steps": steps, "smoke": smoke, "jax": jax.__version__,
                   "device": device or _this_device(),
                   "date": date or time.strftime("%Y-%m-%d"), "rows": rows, **extra},
                  f, indent=1)
    table = markdown([r for r in rows if "error" not in r])
    with open(os.path.join(out, f"{tag}.md"), "w") as f:
        f.write(table + "\n")
    # the tiny budget's plots keep their names; another budget's carry it (memory_10m -> _10m)
    suffix = ("" if budget == "tiny" else f"_{budget}") + (f"_{steps}steps" if steps else "")
    png = plots([r for r in rows if "error" not in r], os.path.join(out, "plots"), suffix=suffix)
    print(table)
    return {"rows": rows, "table": table, "plots": png}


if __name__ == "__main__":
    main()
