"""``mnemax-bench``: the benchmarks that ship with the package (the ``bench`` extra).

    mnemax-bench memory [--budget tiny|10m|125m] [--smoke] [--families ...] [--tasks ...]

``--smoke`` runs a few steps per cell, on every family's first cell and on one cell of
every task (CI checks that the table is produced, not the accuracies).

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

matplotlib (the plots) is checked before anything is trained: without it the command
stops at once with exit status 2 and names the extra to install.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from . import plan, results, runner
from .plots import MissingExtraError, require_matplotlib

USAGE = "usage: mnemax-bench memory [--budget tiny|10m|125m] [--smoke] [--families ...] [--tasks ...] (memory --help: all flags)"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mnemax-bench memory",
                                 description="The side-by-side memory benchmark: every family, the same tasks, matched budgets.")
    ap.add_argument("--budget", default="tiny", choices=sorted(plan.BUDGETS))
    ap.add_argument("--smoke", action="store_true", help="3 steps per cell, every family on one cell and one cell of every task")
    ap.add_argument("--families", nargs="*", help="only these rows (default: every registered family)")
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
    ap.add_argument("--learning_rate", type=float, default=None,
                    help=f"peak learning rate of every cell (default {plan.DEFAULT_LR})")
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
    return ap


def check(args: argparse.Namespace) -> None:
    """ValueError naming the flag for values argparse lets through."""
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise ValueError(f"--seeds: got {args.seeds}; expected distinct integers >= 0")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.parallel < 1:
        raise ValueError(f"--parallel: got {args.parallel}, expected an integer >= 1")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")


def child_argv(args: argparse.Namespace) -> list[str]:
    """The flags a ``--parallel`` process of this run takes from it (each adds its own cell)."""
    argv = ["--budget", args.budget, "--passkey_eval", *map(str, args.passkey_eval)]
    for flag, value in (("--steps", args.steps), ("--learning_rate", args.learning_rate), ("--passkey_len", args.passkey_len)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--smoke"] if args.smoke else [])


def memory(argv=None) -> dict:
    """``mnemax-bench memory``: trains the cells the flags select (or ``--merge``s earlier
    outputs) and writes the table, JSON and plots to ``--out``. Returns
    ``{"rows", "table", "plots"}``.

    Raises:
      MissingExtraError: matplotlib is not installed (checked first).
      ValueError: a flag's value is out of range, names an unknown family / difficulty, or
        ``--merge`` / ``--skip_done`` files do not fit this run.
    """
    args = parser().parse_args(argv)
    require_matplotlib()  # before hours of training, not after
    if args.merge:
        return results.merge(args.merge, args.out)
    check(args)
    budget = dict(plan.BUDGETS[args.budget], **({"steps": args.steps} if args.steps else {}))
    if args.learning_rate is not None:
        budget["lr"] = args.learning_rate
    fams = plan.families(args.families)
    todo = plan.select_cells(args.budget, args.tasks, args.difficulties, args.passkey_len, tuple(args.passkey_eval))
    jobs = plan.jobs(fams, todo, args.seeds, smoke=args.smoke, all_tasks=not args.tasks)
    kept, extra = [], {}
    if args.skip_done:
        earlier, docs = results.done_rows(args.skip_done, args.budget, args.steps, args.smoke)
        jobs, kept = plan.not_done(jobs, earlier, budget.get("lr", plan.DEFAULT_LR))
        print(f"--skip_done: {len(kept)} rows kept, {len(jobs)} cells to train", flush=True)
        devices = {d["device"] for d in docs} | ({results.this_device()} if jobs else set())
        extra = {"merged_from": [m for d in docs for m in d.get("merged_from", [])] + [os.path.abspath(p) for p in args.skip_done],
                 "device": ", ".join(sorted(devices))}
    work = args.workdir or tempfile.mkdtemp(prefix="mnemax-bench-")
    if args.parallel > 1:
        rows = runner.run_parallel(jobs, fams, args.parallel, child_argv(args), work, args.data_dir)
    else:
        rows = runner.run_serial(jobs, fams, args.budget, budget, work, args.data_dir or os.path.join(work, "data"),
                                 smoke=args.smoke, learning_rate=args.learning_rate)
    return results.write(kept + rows, args.budget, args.smoke, args.out, steps=args.steps, **extra)


COMMANDS = {"memory": memory}


def main(argv=None) -> None:
    """The ``mnemax-bench`` console script: ``mnemax-bench <command> [flags]``; exit status
    2 for an unknown command, bad flags or a missing extra (then one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    try:
        COMMANDS[argv[0]](argv[1:])
    except MissingExtraError as err:
        print(f"mnemax-bench {argv[0]}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
