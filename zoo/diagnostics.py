"""Memory-fidelity diagnostics (``mnemax.diagnostics``): ETMF and ECLMF for any zoo model.

The MemMamba paper (Wang et al., arXiv 2510.03279) measures forgetting along time
within a layer (ETMF, "expected token memory fidelity") and across layers (ECLMF,
"expected cross-layer memory fidelity"). Its exact formulas were not available to us;
we implement the following readback definitions, which need nothing but a model's
per-layer outputs.

Let ``e_t`` be token t's embedding (the model's residual stream before the first block)
and ``h^l_s`` a feature of layer l at time s (``kind="stream"``: the residual stream after
block l; ``kind="update"``: what block l added to it, ``h^l - h^{l-1}``; layer 0 is the
embedding itself). The readback fidelity at layer l and distance d is

    F(l, d) = R^2 of the best linear readback of e_t from h^l_{t+d}

fitted by ridge regression in closed form (features and targets centred, penalty
``ridge * trace(X^T X) / n_features``) on the positions t (with t + d < T) of the first
half of the batch rows, and scored on the other half (held out): R^2 = 1 - SSE / SST over
all embedding dimensions (SST about the fitted mean), or with ``metric="cosine"`` the mean
cosine between readback and embedding. Then

    ETMF_l(d) = F(l, d)     d = 0, 1, 2, ...   does token t survive d steps inside layer l?
    ECLMF(l)  = F(l, 0)     l = 0 .. L         does token t survive l layers at its position?

An identity memory (h_{t+d} contains e_t) gives 1; a model that keeps no state gives
about 0 for d >= 1 when tokens are independent (held-out R^2 scatters around 0 and can
be slightly negative). Use random, independent tokens so that a readback at distance d
cannot come from correlations between tokens; R^2 of a linear readback is a lower bound
on what a nonlinear reader could recover.

Per-layer outputs come from the ``layer_outputs`` that :class:`mnemax.SequenceModel` (and
every family model built on it) sows into the "intermediates" collection::

    outs = layer_outputs(model, variables, tokens)          # n_layers + 1 arrays (batch, T, d)
    fid = memory_fidelity(model, variables, tokens, distances=range(16))
    fid["etmf"]   # (n_layers + 1, len(distances));   fid["eclmf"]: (n_layers + 1,)
    plot_fidelity({"mamba": fid["etmf"][-1]}, fid["distances"])
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np

KINDS = ("stream", "update")
METRICS = ("r2", "cosine")


def layer_outputs(model, variables, inputs, state=None, resets=None, kind: str = "stream") -> list[np.ndarray]:
    """The model's per-layer features as float64 numpy arrays: [embedding, layer 1, ..., layer L]
    (``kind="stream"``: the residual stream after each block; ``"update"``: each block's
    contribution, with the embedding first)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    inter = _sown(model)(variables, inputs, state, resets)["intermediates"]
    if "layer_outputs" not in inter:
        raise ValueError(f"the model sowed no 'layer_outputs' (got intermediates {sorted(inter)}); is it a SequenceModel?")
    outs = [np.asarray(o, np.float64) for o in inter["layer_outputs"]]
    return _updates(outs) if kind == "update" else outs


@functools.lru_cache(maxsize=32)
def _sown(model):
    """A jitted apply that returns what ``model`` sows (one compile per model and input shapes)."""
    import jax

    return jax.jit(lambda v, x, s, r: model.apply(v, x, s, r, mutable=["intermediates"])[1])


def _updates(outs):
    return [outs[0]] + [b - a for a, b in zip(outs[:-1], outs[1:])]


def _check(features, targets):
    features, targets = np.asarray(features, np.float64), np.asarray(targets, np.float64)
    if features.ndim != 3 or targets.ndim != 3 or features.shape[:2] != targets.shape[:2]:
        raise ValueError(
            "features and targets must have shapes (batch, time, F) and (batch, time, E) with the same "
            f"batch and time, got {features.shape} and {targets.shape}"
        )
    if features.shape[0] < 2:
        raise ValueError(f"features need batch >= 2 (half the rows fit, half are held out), got batch {features.shape[0]}")
    return features, targets


def readback(features, targets, distance: int, *, ridge: float = 1e-3, metric: str = "r2") -> float:
    """Held-out fidelity of reading ``targets[:, t]`` back from ``features[:, t + distance]``
    (see the module docstring). features: (batch, T, F); targets: (batch, T, E)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    features, targets = _check(features, targets)
    batch, time = features.shape[:2]
    d = int(distance)
    if not 0 <= d < time:
        raise ValueError(f"distance must be in [0, {time}) for sequences of {time} steps, got {distance}")
    x = features[:, d:].reshape(batch, time - d, -1)
    y = targets[:, : time - d]
    half = batch // 2
    x_fit, y_fit = x[:half].reshape(-1, x.shape[-1]), y[:half].reshape(-1, y.shape[-1])
    x_out, y_out = x[half:].reshape(-1, x.shape[-1]), y[half:].reshape(-1, y.shape[-1])
    mx, my = x_fit.mean(0), y_fit.mean(0)
    xc = x_fit - mx
    gram = xc.T @ xc
    penalty = ridge * max(np.trace(gram), 1e-12) / gram.shape[0]
    w = np.linalg.solve(gram + penalty * np.eye(gram.shape[0]), xc.T @ (y_fit - my))
    pred = (x_out - mx) @ w + my
    if metric == "r2":
        sst = np.sum((y_out - my) ** 2)
        return float(1.0 - np.sum((y_out - pred) ** 2) / max(sst, 1e-300))
    num = np.sum(pred * y_out, axis=1)
    den = np.linalg.norm(pred, axis=1) * np.linalg.norm(y_out, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-300)))


def fidelity(layers: Sequence, targets, distances: Sequence[int], **kw) -> np.ndarray:
    """F(l, d) for every layer's features (a list of (batch, T, F) arrays) and distance:
    an array (len(layers), len(distances))."""
    return np.array([[readback(f, targets, d, **kw) for d in distances] for f in layers])


def etmf(layers: Sequence, targets, distances: Sequence[int], **kw) -> np.ndarray:
    """ETMF_l(d): (len(layers), len(distances)) -- fidelity along time inside each layer."""
    return fidelity(layers, targets, distances, **kw)


def eclmf(layers: Sequence, targets, **kw) -> np.ndarray:
    """ECLMF(l) = F(l, 0): (len(layers),) -- fidelity of each token across depth."""
    return fidelity(layers, targets, [0], **kw)[:, 0]


def memory_fidelity(model, variables, inputs, distances: Sequence[int] = tuple(range(16)), *, state=None,
                    resets=None, kind: str = "stream", **kw) -> dict:
    """ETMF and ECLMF of a zoo model on ``inputs`` (use random tokens): a dict with
    ``distances``, ``etmf`` (n_layers + 1, len(distances)) and ``eclmf`` (n_layers + 1,)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    stream = layer_outputs(model, variables, inputs, state, resets)
    outs, embed = (_updates(stream) if kind == "update" else stream), stream[0]
    grid = etmf(outs, embed, distances, **kw)
    return {"distances": np.asarray(list(distances)), "etmf": grid, "eclmf": grid[:, list(distances).index(0)]
            if 0 in list(distances) else eclmf(outs, embed, **kw)}


def plot_fidelity(curves: Mapping[str, Sequence[float]], x=None, ax=None, *, xlabel: str = "distance d (steps)",
                  ylabel: str = "ETMF (held-out $R^2$)", title: str | None = None):
    """Line plot of fidelity curves ({label: values}) against ``x`` (default 0, 1, ...);
    returns the matplotlib axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    for label, values in curves.items():
        values = np.asarray(values, np.float64)
        ax.plot(np.arange(len(values)) if x is None else np.asarray(x), values, marker="o", ms=3, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(frameon=False)
    return ax
