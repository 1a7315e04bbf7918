"""What a memory-benchmark run trains: budgets, families, cells, model sizes, jobs.

A *family* of the benchmark is a row of its table: a zoo preset and fixed overrides.
The rows come from the zoo's registry (:func:`mnemax.list_families`): every registered
family gets one row per preset of it named ``<name>-tiny`` (labelled ``<name>``), unless
:data:`FAMILY_ROWS` gives the family other rows (variants with a key convolution, a
different preset, fixed overrides). A family registered later joins the table without
an edit here.

A *cell* is a task at one difficulty. At a budget (:data:`BUDGETS`) every family is
trained on every cell with the budget's steps and batch, at a size whose parameter count
is closest to the budget's target (:func:`sized_overrides`: ``d_model`` searched, the
layer count the budget's, memories with a capacity sized to the longest evaluated
context).

Passkey is trained at one length and evaluated at 1x, 2x and 4x that length (and by
needle depth); families with a bounded context (a Transformer's attention window) see
only the window, which is the point of the comparison.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

import mnemax

from .. import tasks as tasks_lib

BUDGETS = {  # target parameter counts, training steps, batch
    "tiny": {"params": 60_000, "steps": 400, "batch": 32, "layers": 2},
    "10m": {"params": 10_000_000, "steps": 4000, "batch": 64, "layers": 4},
    "125m": {"params": 125_000_000, "steps": 10000, "batch": 64, "layers": 12},
}

# The peak learning rate of every cell (AdamW, warmup, cosine; ``--learning_rate`` overrides it).
# At the 10m budget with 3e-3 (H100, 2,000 steps, MQAR) mamba stayed at chance and one mLSTM
# cell ended with NaN parameters, while attention and Hopfield with a key conv solved it; at
# 1e-3 the 10m mLSTM solves 16 and 64 pairs (benchmarks/RESULTS.md), so the 10m runs there
# pass --learning_rate 1e-3.
DEFAULT_LR = 3e-3

# The family the comparison is against: first in the tables, and the one a smoke run trains
# on one cell of every task.
BASELINE = "transformer"

# Registered families whose rows are not the default (one row per "<name>-tiny" preset):
# registry family -> {row label: (preset, fixed overrides)}.
FAMILY_ROWS: dict[str, dict[str, tuple[str, dict]]] = {
    "transformer": {
        "transformer": ("transformer-tiny", {"num_heads": 2}),
        "transformer+keyconv": ("transformer-tiny", {"num_heads": 2, "key_conv": 4}),
    },
    "hopfield": {
        "hopfield": ("hopfield-tiny", {}),
        "hopfield+keyconv": ("hopfield-tiny", {"key_conv": 4}),  # stored patterns see the 3 steps before
    },
    # chunks of 16 steps (the layer's default; the tiny preset's 4); the number of chunks is
    # set per cell by sized_overrides so that the memory holds the whole episode, as in the paper
    "hcam": {"hcam": ("hcam-tiny", {"chunk_size": 16})},
    # the plain ELM neuron (every input on its own synapse), memory units = d_model so the
    # budget sizes it; elm-tiny is a Branch-ELM of 3 x 3 synapses, which saw 9 of a task's inputs
    "elm": {"elm": ("elm-small", {"num_memory": None})},
    # fla's GLA layer as published (no token shift), and with its use_short_conv option: the
    # tiny MQAR cell learns late without it (0.216 at 2,000 steps) and 0.393 with it (RESULTS.md)
    "gla": {"gla": ("gla-tiny", {}), "gla+conv": ("gla-tiny", {"use_short_conv": True})},
}

# Overrides of the long budgets (10m, 125m) on top of a family's fixed ones. The tiny presets'
# 2 heads and 16-step chunks, scaled to d_model 768, give the mLSTM 768 x 768 matrix states
# per head, and the xla chunkwise form keeps a (batch, heads, chunks, d_qk, d_v) stack of them
# (and its associative scan's levels): the 10m MQAR train step asked the H100 for 50 GiB
# (CPU compile: 106 GB of temporaries). 4 heads and 64-step chunks, as in xlstm-125m, give
# 384-wide heads and a quarter of the chunks (22 GB).
#
# Mamba-2 and Gated DeltaNet go the other way: gdn-tiny's 2 heads of 16 stay 2 x 16 x 16 at any
# d_model (a 512-number state per layer beside a 512-wide model), and mamba2-tiny's 16-wide heads
# with d_state 16 become 96 heads of 16 x 16 at d 768. On the long budgets they take their
# published head layouts instead -- Mamba-2's head_dim 64 and d_state 128 (mamba2-130m), GDN's
# heads of 128 with expand_v 2 (gdn-125m), 4 of them -- and 64-step chunks. Sized to the 10m
# budget that is d 512 (16 heads, 7.0 M parameters) for Mamba-2 and d 384 (11.2 M) for GDN,
# 131,072 numbers of state per layer each: the MQAR comparison the GDN paper makes, at equal
# memory. One layer's MQAR gradient at batch 64 then needs about 3 GiB of temporaries for
# either (XLA's count on a CPU), as Mamba's does.
LONG_BUDGET_OVERRIDES: dict[str, dict] = {
    "mlstm": {"num_heads": 4, "chunk_size": 64},
    "xlstm": {"num_heads": 4, "chunk_size": 64},
    "mamba2": {"head_dim": 64, "d_state": 128, "chunk_size": 64},
    "gdn": {"num_heads": 4, "head_dim": 128, "expand_v": 2.0, "chunk_size": 64},
    # KDA's tiny preset has GDN's fixed 2 heads of 16; kda-125m's heads of 128 (expand_v 1)
    "kda": {"num_heads": 4, "head_dim": 128, "chunk_size": 64},
    # DeltaNet and GLA size their heads from d_model: the tiny presets' 2 heads and 16-step
    # chunks would give DeltaNet heads of 256 at the 10m budget's d 512; deltanet-125m's heads
    # of 128 (4 at d 512) and gla-125m's 4 heads (d_k 64, d_v 128 at d 512), 64-step chunks
    "deltanet": {"num_heads": 4, "chunk_size": 64},
    "gla": {"num_heads": 4, "chunk_size": 64},
}
LONG_BUDGET_OVERRIDES["gla+conv"] = LONG_BUDGET_OVERRIDES["gla"]

TINY_SUFFIX = "-tiny"


def _presets_by_family() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in mnemax.list_models():
        out.setdefault(mnemax.get_config(name).family, []).append(name)
    return out


def all_families() -> dict[str, tuple[str, dict]]:
    """Every row the registry gives the benchmark, ``{label: (preset, fixed overrides)}``:
    :data:`BASELINE`'s rows first, then the registry's families in its order."""
    presets = _presets_by_family()
    rows: dict[str, tuple[str, dict]] = {}
    for family in sorted(mnemax.list_families(), key=lambda f: f != BASELINE):
        if family in FAMILY_ROWS:
            rows.update({label: (preset, dict(fixed)) for label, (preset, fixed) in FAMILY_ROWS[family].items()})
        else:
            rows.update({p[: -len(TINY_SUFFIX)]: (p, {}) for p in presets.get(family, []) if p.endswith(TINY_SUFFIX)})
    return rows


def unbenchmarked_families() -> list[str]:
    """Registered families the benchmark has no row for (no ``<name>-tiny`` preset and no
    :data:`FAMILY_ROWS` entry): left out of every run."""
    presets = _presets_by_family()
    return sorted(f for f in mnemax.list_families()
                  if f not in FAMILY_ROWS and not any(p.endswith(TINY_SUFFIX) for p in presets.get(f, [])))


def families(selected=None) -> dict[str, tuple[str, dict]]:
    """:func:`all_families`, or the ``selected`` labels of it in that order (``--families``;
    ValueError naming the unknown ones)."""
    rows = all_families()
    if selected:
        unknown = sorted(set(selected) - set(rows))
        if unknown:
            raise ValueError(f"--families: unknown {unknown}; available {sorted(rows)}")
        rows = {k: rows[k] for k in selected}
    return rows


def family_overrides(family: str, fixed: dict, budget: str) -> dict:
    """A family's fixed overrides at ``budget``: ``fixed`` plus, on the long budgets,
    :data:`LONG_BUDGET_OVERRIDES`."""
    if budget not in BUDGETS:
        raise ValueError(f"budget: got {budget!r}, expected one of {sorted(BUDGETS)}")
    return dict(fixed) if budget == "tiny" else {**fixed, **LONG_BUDGET_OVERRIDES.get(family, {})}


@dataclasses.dataclass(frozen=True)
class Cell:
    """A task at one difficulty: ``params`` are the task's parameters; ``eval_lengths`` the
    sequence lengths the trained model is also evaluated at (passkey)."""

    task: str
    difficulty: str
    params: dict = dataclasses.field(hash=False)
    eval_lengths: tuple = ()


def cells(budget: str, passkey_len: int | None = None, passkey_eval: tuple = (1, 2, 4)) -> list[Cell]:
    """The budget's cells. ``passkey_len``: train passkey at this length instead of the
    budget's (256 at 10m / 125m, 64 at tiny). ``passkey_eval``: the multiples of that
    length passkey is evaluated at (default 1x, 2x and 4x); memories with a capacity are
    sized to the longest (:func:`sized_overrides`)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget: got {budget!r}, expected one of {sorted(BUDGETS)}")
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


def select_cells(budget: str, tasks=None, difficulties=None, passkey_len: int | None = None,
                 passkey_eval: tuple = (1, 2, 4)) -> list[Cell]:
    """The budget's cells of ``tasks`` (all if empty) at ``difficulties`` (all if empty;
    ValueError naming unknown ones), in the budget's order."""
    todo = [c for c in cells(budget, passkey_len, passkey_eval) if not tasks or c.task in tasks]
    if difficulties:
        known = {c.difficulty for c in todo}
        if set(difficulties) - known:
            raise ValueError(f"--difficulties: unknown {sorted(set(difficulties) - known)}; the cells have {sorted(known)}")
        todo = [c for c in todo if c.difficulty in difficulties]
    return todo


@functools.lru_cache(maxsize=None)
def _count_params(preset: str, overrides: tuple) -> int | None:
    try:
        cfg = mnemax.get_config(preset, **dict(overrides))
        return mnemax.release.count_params(mnemax.release.abstract_params(mnemax.build(cfg)))
    except (ValueError, TypeError):
        return None


def count_params(preset: str, overrides: dict) -> int | None:
    """The parameter count of ``preset`` with ``overrides`` (None: a size the preset
    refuses), traced once per distinct configuration (the cells of a budget share most)."""
    return _count_params(preset, tuple(sorted(overrides.items())))


D_MODELS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def sized_overrides(preset: str, fixed: dict, spec: tasks_lib.TaskSpec, target: int, layers: int,
                    span: int | None = None) -> tuple[dict, int]:
    """Overrides (d_model and fixed ones) whose parameter count is closest to ``target``,
    and that count. ``span``: the longest context the model is evaluated at (default 4x the
    task's length)."""
    best = None
    span = span or 4 * spec.seq_len
    base = mnemax.get_config(preset)
    block = base.block
    for d in D_MODELS:
        ov = {**fixed, "d_model": d, **spec.model_overrides()}
        if "n_layers" in base.to_dict() and base.n_layers > 1:
            ov["n_layers"] = layers
        # Memories with a capacity cover the longest evaluated context (passkey at 4x), so a
        # family is not cut off by a preset's small window: attention's window, the causal
        # Hopfield ring buffer (hopfield-tiny kept 32 steps), HCAM's chunks (8 of 4 steps).
        if "window" in block:
            ov["window"] = span
        if "memory_size" in block:
            ov["memory_size"] = span
        if "num_chunks" in block:
            ov["num_chunks"] = -(-span // ov.get("chunk_size", block["chunk_size"]))
        n = count_params(preset, ov)
        if n is None:
            continue
        if best is None or abs(np.log(n / target)) < abs(np.log(best[1] / target)):
            best = (ov, n)
    if best is None:
        raise ValueError(f"no size of {preset!r} fits the task {spec.name!r}")
    return best


class Job(NamedTuple):
    """One training run: a family on a cell with a seed."""

    family: str
    cell: Cell
    seed: int


def jobs(family_labels, todo: list[Cell], seeds, *, smoke: bool = False, all_tasks: bool = True) -> list[Job]:
    """Every family on every cell of ``todo``, once per seed, family by family. ``smoke``
    with ``all_tasks`` (no ``--tasks`` given): every family on the first cell, and the first
    family (:data:`BASELINE` when it is among them) on one cell of every other task."""
    labels = list(family_labels)
    plan = [(f, c) for f in labels for c in todo]
    if smoke and all_tasks and todo:
        first = BASELINE if BASELINE in labels else labels[0]
        first_of_task = list({c.task: c for c in reversed(todo)}.values())[::-1]
        plan = [(f, todo[0]) for f in labels] + [(first, c) for c in first_of_task if c is not todo[0]]
    return [Job(f, c, s) for f, c in plan for s in seeds]


def run_name(budget: str, steps: int, job: Job, *, learning_rate: float | None = None, smoke: bool = False) -> str:
    """The directory name of one training run under ``--workdir``: one per budget, steps,
    explicit rate, smoke setting, family, cell and seed, so that a reused ``--workdir``
    never resumes another run's checkpoint (the trainer resumes a workdir's newest)."""
    lr_tag = f"-lr{learning_rate:g}" if learning_rate is not None else ""
    seed_tag = f"-seed{job.seed}" if job.seed else ""
    name = f"{budget}-{steps}steps{lr_tag}{'-smoke' if smoke else ''}-{job.family}-{job.cell.task}-{job.cell.difficulty}{seed_tag}"
    return name.replace("=", "")


def row_key(row: dict) -> tuple:
    """(family, task, difficulty, seed): what makes two rows the same cell of one run."""
    return row["family"], row["task"], row["difficulty"], row.get("seed", 0)


def not_done(todo: list[Job], done_rows: list[dict], learning_rate: float) -> tuple[list[Job], list[dict]]:
    """``--skip_done``: the jobs of ``todo`` that ``done_rows`` (earlier error-free rows) do
    not hold at ``learning_rate``, and the earlier rows to keep. A passkey row counts as done
    only if it was evaluated at every length its cell asks for now; a kept row that such a
    job trains again is dropped (the new row replaces it)."""
    done = {row_key(r): r for r in done_rows if r.get("lr") == learning_rate}

    def is_done(job: Job) -> bool:
        r = done.get((job.family, job.cell.task, job.cell.difficulty, job.seed))
        return r is not None and all(f"acc len={n}" in r for n in job.cell.eval_lengths)

    left = [j for j in todo if not is_done(j)]
    stale = {(j.family, j.cell.task, j.cell.difficulty, j.seed) for j in left}
    kept = [r for r in done_rows if row_key(r) not in stale or r.get("lr") != learning_rate]
    return left, kept
