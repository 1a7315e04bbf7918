"""Benchmark rows -> accuracy plots (PNG): MQAR accuracy against the number of key-value
pairs, passkey accuracy against the evaluated context length.

matplotlib is the ``bench`` extra (``pip install "mnemax[bench]"``): it is imported when a
plot is drawn, and :func:`require_matplotlib` lets a command check for it before it
spends hours training.
"""

from __future__ import annotations

import os

from .tables import by_cell, label, length_key, stat

EXTRA_HINT = 'pip install "mnemax[bench]"  (from a checkout: pip install -e ".[bench]")'


class MissingExtraError(ImportError):
    """A package of the ``bench`` extra is not installed."""


def require_matplotlib() -> None:
    """Imports matplotlib (and its cycler); MissingExtraError naming the ``bench`` extra if
    either is missing."""
    try:
        import cycler  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise MissingExtraError(
            f"the benchmark's plots need matplotlib, which is not importable ({err}); install the bench extra: {EXTRA_HINT}"
        ) from err


def plots(rows: list[dict], out_dir: str, suffix: str = "") -> list[str]:
    """Writes ``mqar_accuracy_vs_pairs{suffix}.png`` and ``passkey_accuracy_vs_length{suffix}.png``
    (for the tasks ``rows`` hold) into ``out_dir``; returns their paths. A cell with several
    seeds is drawn at its mean, MQAR with the seeds' range shaded."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    os.makedirs(out_dir, exist_ok=True)
    # 12+ families: 20 colours and alternating line styles, so no two share a look
    plt.rcParams["axes.prop_cycle"] = (cycler(linestyle=["-", "--"]) * cycler(color=plt.get_cmap("tab20").colors[::2]))[:20]
    paths = []
    mq = [r for r in rows if r["task"] == "mqar"]
    if mq:
        fig, ax = plt.subplots(figsize=(6, 4))
        cells_of = by_cell(mq)
        for f in dict.fromkeys(label(r, mq) for r in mq):
            pts = sorted((int(d.split("=")[1]), *stat(v)) for (lab, _, d), v in cells_of.items() if lab == f)
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
        plt.close(fig)
        paths.append(p)
    pk = [r for r in rows if r["task"] == "passkey"]
    if pk:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (lab, _, _), rs in by_cell(pk).items():  # the mean over seeds
            keys = sorted({k for r in rs for k in r if k.startswith("acc len=")}, key=length_key)
            if keys:
                ax.plot([length_key(k) for k in keys], [stat(rs, k)[0] for k in keys], marker="o", label=lab)
        ax.set(xlabel="context length (trained at the first point)", ylabel="passkey accuracy", xscale="log", ylim=(0, 1.02))
        lengths = sorted({length_key(k) for r in pk for k in r if k.startswith("acc len=")})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        p = os.path.join(out_dir, f"passkey_accuracy_vs_length{suffix}.png")
        fig.savefig(p, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths
