"""A benchmark run's files: ``memory_<budget>[_<steps>steps][_smoke].json`` (the rows and
where, when and with what they were measured), the same table as markdown, and the plots
under ``plots/``; merging several runs' JSON into one, and reading earlier rows back
(``--skip_done``)."""

from __future__ import annotations

import json
import os
import time

import jax

from .plots import plots
from .tables import markdown


def this_device() -> str:
    """This process's first device and its kind, as the JSON records it."""
    return f"{jax.devices()[0]} ({jax.devices()[0].device_kind})"


def file_tag(budget: str, steps: int | None, smoke: bool) -> str:
    """``memory_<budget>[_<steps>steps][_smoke]``: the files' name (``steps``: the ``--steps``
    override, if any, so that a longer run does not overwrite the budget's own table)."""
    return f"memory_{budget}{f'_{steps}steps' if steps else ''}{'_smoke' if smoke else ''}"


def write(rows: list[dict], budget: str, smoke: bool, out: str, steps: int | None = None, device: str | None = None,
          date: str | None = None, **extra) -> dict:
    """Writes :func:`file_tag` ``.json`` / ``.md`` into ``out`` and the plots under
    ``out/plots``; prints the table. ``device`` / ``date``: where and when the rows were
    measured (default: this process's first device, today); ``extra``: more fields of the
    JSON (``merged_from``). Rows with an ``error`` are kept in the JSON, left out of the
    table and plots. Returns ``{"rows", "table", "plots"}``."""
    os.makedirs(out, exist_ok=True)
    tag = file_tag(budget, steps, smoke)
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump({"budget": budget, "steps": steps, "smoke": smoke, "jax": jax.__version__,
                   "device": device or this_device(),
                   "date": date or time.strftime("%Y-%m-%d"), "rows": rows, **extra},
                  f, indent=1)
    good = [r for r in rows if "error" not in r]
    table = markdown(good)
    failed = [r for r in rows if "error" in r]
    if failed:  # said under the table, not only in the JSON
        table += "\n\nCells that failed (their rows, with the error, are in the JSON):\n\n" + "\n".join(
            f"- {r['family']} {r['task']} {r['difficulty']} (seed {r.get('seed', 0)}): {r['error'][:160]}" for r in failed)
    with open(os.path.join(out, f"{tag}.md"), "w") as f:
        f.write(table + "\n")
    # the tiny budget's plots keep their names; another budget's carry it (memory_10m -> _10m)
    suffix = ("" if budget == "tiny" else f"_{budget}") + (f"_{steps}steps" if steps else "")
    png = plots(good, os.path.join(out, "plots"), suffix=suffix)
    print(table)
    return {"rows": rows, "table": table, "plots": png}


def read(paths: list[str], flag: str) -> list[dict]:
    """The JSON documents at ``paths`` (ValueError naming ``flag`` for a missing one)."""
    docs = []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{flag}: {path!r} does not exist; expected an earlier memory_<budget>*.json")
        with open(path) as f:
            docs.append(json.load(f))
    return docs


def merge(paths: list[str], out: str) -> dict:
    """``--merge``: the rows of the runs at ``paths`` (one budget and ``--steps``) as one
    table and plots in ``out``, recording the devices and dates the rows were measured on
    (not the merging machine's)."""
    docs = read(paths, "--merge")
    budgets = {(d["budget"], d.get("steps")) for d in docs}
    if len(budgets) != 1:
        raise ValueError(f"--merge: the files come from different budgets or --steps {sorted(budgets, key=str)}; expected one")
    rows = [r for d in docs for r in d["rows"]]
    return write(rows, docs[0]["budget"], any(d["smoke"] for d in docs), out, steps=docs[0].get("steps"),
                 device=", ".join(sorted({d["device"] for d in docs})), date=max(d["date"] for d in docs),
                 merged_from=[os.path.abspath(p) for p in paths])


def done_rows(paths: list[str], budget: str, steps: int | None, smoke: bool) -> tuple[list[dict], list[dict]]:
    """``--skip_done``: the error-free rows of the earlier outputs ``paths``, and their
    documents; each must come from this ``budget``, ``--steps`` and smoke setting."""
    docs = read(paths, "--skip_done")
    rows = []
    for path, doc in zip(paths, docs):
        got = (doc.get("budget"), doc.get("steps"), bool(doc.get("smoke")))
        if got != (budget, steps, smoke):
            raise ValueError(f"--skip_done: {path!r} has (budget, steps, smoke) {got}; expected {(budget, steps, smoke)} "
                             "as in this run")
        rows += [r for r in doc["rows"] if "error" not in r]
    return rows, docs
