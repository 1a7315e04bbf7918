"""Release bundles: save a trained model so that others can load it onto any mesh.

A bundle is a directory::

    params/          orbax checkpoint of the parameters (no pickles)
    config.json      {"format", "mnemax_version", "family", "preset", "config", "extra"}
    README.md        the model card
    checksums.sha256 sha256 of every other file, verified on load

``save_pretrained(path, model, params)`` writes one; ``load_pretrained(path,
mesh=None)`` verifies the checksums, rebuilds the model from ``config.json``,
checks that the stored parameters fit it, and restores them onto ``mesh`` (sharded
by the logical axis rules of :mod:`mnemax.sharding`) or onto one device.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "mnemax-release/1"
CHECKSUMS = "checksums.sha256"


class ReleaseError(ValueError):
    """A bundle that is incomplete, altered, or does not fit its config."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            if rel != CHECKSUMS:
                out.append(rel)
    return sorted(out)


def example_inputs(config):
    """A (1, 1) input of the right kind for ``model.init`` of a zoo config."""
    if config.vocab_size is not None:
        return jnp.zeros((1, 1), jnp.int32)
    return jnp.zeros((1, 1, config.input_dim), jnp.float32)


def abstract_params(model):
    """Boxed abstract parameters (with logical names) of a zoo model, without allocating."""
    return jax.eval_shape(model.init, jax.random.key(0), example_inputs(model.config))


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params))))


def _model_card(model, params, extra: dict | None, version: str) -> str:
    cfg = model.config
    extra = extra or {}
    lines = [
        f"# {cfg.preset or cfg.family} (mnemax {cfg.family})",
        "",
        f"A `{cfg.family}` model from the mnemax zoo, released {datetime.date.today().isoformat()} with mnemax {version}.",
        "",
        "## Load",
        "",
        "```python",
        "import mnemax",
        "model, params = mnemax.load_pretrained('<this directory>')   # or mesh=jax.make_mesh(...)",
        "outputs, state = model.apply(params, inputs)",
        "```",
        "",
        "## Model",
        "",
        f"- parameters: {count_params(params):,}",
        f"- inputs: {'tokens, vocabulary ' + str(cfg.vocab_size) if cfg.vocab_size else 'features of width ' + str(cfg.input_dim)}",
        f"- head: {cfg.head} ({cfg.outputs} outputs)",
        f"- d_model {cfg.d_model}, {cfg.n_layers} blocks, compute dtype {cfg.dtype}",
        "",
        "| option | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(cfg.to_dict()["block"].items())]
    if extra:
        lines += ["", "## Training and evaluation", "", "```json", json.dumps(extra, indent=2, sort_keys=True, default=str), "```"]
    lines += [
        "",
        "## Intended use and limits",
        "",
        "A research checkpoint for studying memory architectures; evaluated only on the task above.",
        "",
        "Files are verified against `checksums.sha256` on load.",
    ]
    return "\n".join(lines) + "\n"


def save_pretrained(path: str | os.PathLike, model, params, *, extra: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Writes a release bundle of ``model`` (a zoo model) with ``params`` to ``path``.

    ``params`` is what ``model.init`` returns (boxed or not). ``extra`` is any
    JSON-serialisable metadata (training task, metrics) kept in ``config.json`` and the
    model card. In a multi-process run every process must call this (the parameter
    write is collective); process 0 writes the other files.
    """
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from mnemax import __version__

    path = os.path.abspath(os.fspath(path))
    if not hasattr(model, "config"):
        raise ValueError(f"model must be a zoo model with a .config, got {type(model).__name__}")
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise ReleaseError(f"path {path!r} exists and is not empty (pass overwrite=True)")
    plain = nn.meta.unbox(params)
    expected = nn.meta.unbox(abstract_params(model))
    _check_fits(expected, plain, "params")
    main = jax.process_index() == 0
    if main and os.path.exists(path) and overwrite:
        import shutil

        shutil.rmtree(path)
    multihost_utils.sync_global_devices("mnemax.save_pretrained:clean")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "params"), plain)
        ckpt.wait_until_finished()
    if main:
        meta = {
            "format": FORMAT,
            "mnemax_version": __version__,
            "family": model.config.family,
            "preset": model.config.preset,
            "config": model.config.to_dict(),
            "extra": extra or {},
        }
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(_model_card(model, plain, extra, __version__))
        with open(os.path.join(path, CHECKSUMS), "w") as f:
            for rel in _files(path):
                f.write(f"{_sha256(os.path.join(path, rel))}  {rel}\n")
    multihost_utils.sync_global_devices("mnemax.save_pretrained:done")
    return path


def verify(path: str | os.PathLike) -> dict:
    """Checks a bundle's files against its checksums; returns the parsed config.json."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"release bundle {path!r} does not exist")
    for name in (CHECKSUMS, "config.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"release bundle {path!r} is missing {name}")
    listed = {}
    with open(os.path.join(path, CHECKSUMS)) as f:
        for line in f:
            if line.strip():
                digest, rel = line.rstrip("\n").split("  ", 1)
                listed[rel] = digest
    for rel, digest in sorted(listed.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"release bundle {path!r} is missing {rel} (listed in {CHECKSUMS})")
        if _sha256(full) != digest:
            raise ReleaseError(f"checksum mismatch for {rel} in {path!r}: the file was altered or truncated")
    unlisted = sorted(set(_files(path)) - set(listed))
    if unlisted:
        raise ReleaseError(f"files not covered by {CHECKSUMS} in {path!r}: {unlisted[:5]}")
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ReleaseError(f"config.json format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _check_fits(expected, actual, what: str) -> None:
    exp = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(actual)}
    missing, unexpected = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    wrong = sorted(k for k in set(exp) & set(got) if exp[k] != got[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(f"{k}: {got[k]} vs config {exp[k]}" for k in wrong[:3]))
        raise ReleaseError(f"{what} do not fit the config: " + "; ".join(parts))


def load_pretrained(path: str | os.PathLike, mesh=None, *, rules=None):
    """Loads a release bundle: returns ``(model, params)``.

    Verifies checksums, rebuilds the model from ``config.json``, checks the stored
    parameter shapes against it, and restores onto ``mesh`` (a ``jax.sharding.Mesh``
    with some of the axes ``data``/``fsdp``/``tensor``) or onto the default device.
    """
    import orbax.checkpoint as ocp

    from .config import ModelConfig
    from .registry import build
    from .sharding import RULES, tree_shardings

    meta = verify(path)
    path = os.path.abspath(os.fspath(path))
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ReleaseError(f"config.json in {path!r} does not describe a valid model: {err}") from None
    model = build(config)
    boxed = abstract_params(model)
    expected = nn.meta.unbox(boxed)
    params_dir = os.path.join(path, "params")
    with ocp.StandardCheckpointer() as ckpt:
        stored = ckpt.metadata(params_dir)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        _check_fits(expected, stored_tree, "stored params")
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, expected)
        else:
            shardings = tree_shardings(boxed, mesh, rules or RULES)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), expected, shardings)
        params = ckpt.restore(params_dir, target)
    return model, params
