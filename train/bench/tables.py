"""Benchmark rows -> the markdown accuracy table.

A row is one trained cell: ``family``, ``task``, ``difficulty``, ``params``, ``accuracy``
(held-out), ``seed``, ``lr`` and, for passkey, ``acc len=<n>`` (accuracy at other
lengths) and ``acc depth...`` (by needle depth). Rows of one (family, rate, task,
difficulty) at several seeds are one table cell: their mean and range.
"""

from __future__ import annotations

import numpy as np

from .plan import DEFAULT_LR


def natural(key: tuple[str, str]) -> tuple:
    """Sort key of a (task, difficulty) column: ``pairs=8`` before ``pairs=16``."""
    task, diff = key
    name, _, num = diff.partition("=")
    return (task, name, int(num) if num.isdigit() else num)


def label(row: dict, rows: list[dict]) -> str:
    """A row's family, with its learning rate when ``rows`` were trained at several."""
    if len({r.get("lr", DEFAULT_LR) for r in rows}) > 1:  # rows from before "lr" was recorded ran at the default
        return f"{row['family']} (lr {row.get('lr', DEFAULT_LR):g})"
    return row["family"]


def by_cell(rows: list[dict]) -> dict:
    """(label, task, difficulty) -> that cell's rows, one per seed."""
    out: dict = {}
    for r in rows:
        out.setdefault((label(r, rows), r["task"], r["difficulty"]), []).append(r)
    return out


def stat(rs: list[dict], key: str = "accuracy") -> tuple[float, float, float]:
    """(mean, min, max) of ``key`` over a cell's seeds (nan where a row lacks it)."""
    v = np.array([r.get(key, np.nan) for r in rs], float)
    return float(np.mean(v)), float(np.min(v)), float(np.max(v))


def fmt(rs: list[dict], key: str = "accuracy") -> str:
    """One seed: the value; several: ``mean (min-max)``; not measured: ``-``."""
    mean, lo, hi = stat(rs, key)
    if np.isnan([lo, hi]).all():  # not measured in this cell (e.g. a length only some rows were evaluated at)
        return "-"
    return f"{mean:.3f}" if len(rs) == 1 else f"{mean:.3f} ({lo:.3f}-{hi:.3f})"


def length_key(key: str) -> int:
    """``"acc len=256"`` -> 256."""
    return int(key.split("=")[1])


def markdown(rows: list[dict]) -> str:
    """The accuracy table: a row per family (per family and learning rate when the rows
    hold several rates), a column per (task, difficulty). A cell run with several seeds
    shows the mean accuracy and, in brackets, the lowest and highest. Passkey rows add a
    second table: accuracy by evaluation length and by needle depth."""
    cols = sorted({(r["task"], r["difficulty"]) for r in rows}, key=natural)
    fams = list(dict.fromkeys(label(r, rows) for r in rows))
    cells_of = by_cell(rows)
    seeds = sorted({len(v) for v in cells_of.values()})
    head = "| family | params | " + " | ".join(f"{t} {d}" for t, d in cols) + " |"
    sep = "| --- | --- | " + " | ".join("---" for _ in cols) + " |"
    lines = [head, sep]
    for f in fams:
        mine = {(t, d): v for (lab, t, d), v in cells_of.items() if lab == f}
        params = sorted({r["params"] for v in mine.values() for r in v})
        cells_ = [fmt(mine[c]) if c in mine else "-" for c in cols]
        lines.append(f"| {f} | {params[0]:,}-{params[-1]:,} | " + " | ".join(cells_) + " |")
    if seeds and seeds != [1]:
        n = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]} to {seeds[-1]} seeds"
        lines += ["", f"Each cell: the mean accuracy over its {n} and, in brackets, the lowest and highest."]
    extra = [k for k, v in cells_of.items() if any(key.startswith("acc len=") for r in v for key in r)]
    if extra:
        keys = {key for k in extra for r in cells_of[k] for key in r}
        lens = sorted((k for k in keys if k.startswith("acc len=")), key=length_key)
        depths = sorted(k for k in keys if k.startswith("acc depth"))
        lines += ["", "Passkey, trained at the first length: accuracy by evaluation length and by needle depth (training length)", "",
                  "| family | " + " | ".join(lens + depths) + " |", "| --- | " + " | ".join("---" for _ in lens + depths) + " |"]
        for k in extra:
            lines.append(f"| {k[0]} | " + " | ".join(fmt(cells_of[k], key) for key in lens + depths) + " |")
    return "\n".join(lines)
