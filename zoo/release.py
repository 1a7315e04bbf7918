"""Release bundles: save a trained model so that others can load it onto any mesh.

A bundle is a directory::

    params/          orbax checkpoint of the parameters (no pickles)
    config.json      {"format", "mnemax_version", "family", "preset", "config", "extra"}
    README.md        the model card
    checksums.sha256 sha256 of every other file, verified on load

``config.json`` formats (``"format"``):

* ``mnemax-release/2`` (written now): ``config`` holds the :class:`ModelConfig` fields,
  its ``block`` every option of the family's typed config class (e.g. ``MambaConfig``)
  -- all of them, no other (a missing or unknown option is an error naming it); tuples
  are JSON lists. The kernel sharding a model was built with is not stored (it says
  where the model runs: ``mnemax.build(model.config, kernel_sharding=...)`` after loading).
* ``mnemax-release/1`` (before the typed configs): the same layout, with ``block`` the
  family's keyword table of that time, which may lack options added since.
  :func:`upgrade_v1` converts it (an option it lacks takes the family's default; one the
  family no longer has is an error naming it), and ``load_pretrained`` loads both.

``save_pretrained(path, model, params)`` writes one; ``load_pretrained(path,
mesh=None)`` verifies the checksums, rebuilds the model from ``config.json``,
checks that the stored parameters fit it, and restores them onto ``mesh`` (sharded
by the logical axis rules of :mod:`mnemax.sharding`) or onto one device.

Safety rules (violations raise :class:`ReleaseError`, a ``ValueError``, naming the path,
file, line or entry at fault):

* ``save_pretrained`` writes into a path that does not exist or is an empty directory.
  With ``overwrite=True`` it also replaces an earlier bundle: a directory whose
  ``config.json`` declares this release ``format`` and that holds nothing but bundle
  files (``params/``, ``config.json``, ``README.md``, ``checksums.sha256``). Any other
  directory (or a file) is refused and left untouched, so ``overwrite`` never deletes
  files that ``save_pretrained`` did not write.
* ``checksums.sha256`` is read line by line in the ``sha256sum`` form ``<64 hex
  digits>  <path>``; a malformed line is reported with its line number. Every entry
  must be a normalised relative path inside the bundle (no absolute path, no ``.``/``..``
  component, no duplicates), and the entries must be exactly the bundle's files, all
  checked before any listed file is read. A symbolic link in the bundle that leads
  outside it (or to a directory) is refused, so loading reads nothing outside the bundle.
* A ``config.json`` that is not valid JSON is reported with the JSON error's position.
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

FORMAT = "mnemax-release/2"
FORMAT_V1 = "mnemax-release/1"
FORMATS = (FORMAT_V1, FORMAT)  # the formats load_pretrained reads
CHECKSUMS = "checksums.sha256"
CONFIG = "config.json"
# Everything save_pretrained writes at the top of a bundle: only a directory holding
# nothing else (and a config.json of one of FORMATS) is replaced by overwrite=True.
BUNDLE_ENTRIES = frozenset({"params", CONFIG, "README.md", CHECKSUMS})
_HEX = frozenset("0123456789abcdef")


class ReleaseError(ValueError):
    """A bundle that is incomplete, altered, unsafe, or does not fit its config; or a
    path that save_pretrained refuses to write to."""


def sha256_file(path: str) -> str:
    """Hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(target: str, root: str) -> bool:
    return os.path.commonpath([target, root]) == root


def bundle_files(root: str) -> list[str]:
    """The files of the bundle at ``root`` (``/``-separated, relative, sorted), without
    ``checksums.sha256``. Raises ReleaseError for a symbolic link that leads outside the
    bundle or to a directory, and for anything that is neither a file nor a directory."""
    root = os.path.abspath(root)
    real_root = os.path.realpath(root)
    out = []
    for dirpath, dirnames, names in os.walk(root):
        for n in sorted(dirnames) + sorted(names):
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not _inside(target, real_root):
                    raise ReleaseError(
                        f"release bundle {root!r}: {rel} is a symbolic link leading outside the bundle (to {target!r})"
                    )
                if os.path.isdir(full):
                    raise ReleaseError(f"release bundle {root!r}: {rel} is a symbolic link to a directory; a bundle holds plain files")
            if n in dirnames and not os.path.islink(full):
                continue  # os.walk descends into it
            if not os.path.isfile(full):
                raise ReleaseError(f"release bundle {root!r}: {rel} is not a regular file")
            if rel != CHECKSUMS:
                out.append(rel)
    return sorted(out)


def _check_entry(rel: str, lineno: int, path: str) -> None:
    """A checksum entry must be a normalised relative path that stays inside the bundle."""
    where = f"{CHECKSUMS} in {path!r}, line {lineno}: entry {rel!r}"
    if not rel:
        raise ReleaseError(f"{CHECKSUMS} in {path!r}, line {lineno}: empty path")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        raise ReleaseError(f"{where} is an absolute path; entries must be relative to the bundle")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise ReleaseError(f"{where} leaves the bundle ('..'); entries must stay inside the bundle")
    if any(p in ("", ".") for p in parts) or "\x00" in rel:
        raise ReleaseError(f"{where} is not a normalised relative path (empty or '.' component)")


def read_checksums(path: str | os.PathLike) -> dict[str, str]:
    """Parses the bundle's ``checksums.sha256``: ``{relative path: hex digest}``.

    Each non-blank line is ``<64 hex digits>  <path>``; entries are checked to be
    normalised relative paths inside the bundle (no file is read but the checksums
    file). Raises ReleaseError naming the line number of a malformed line or entry."""
    path = os.path.abspath(os.fspath(path))
    with open(os.path.join(path, CHECKSUMS), "rb") as f:
        raw = f.read()
    listed: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, line_bytes in enumerate(raw.split(b"\n"), 1):
        try:
            line = line_bytes.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            raise ReleaseError(f"{CHECKSUMS} in {path!r}, line {lineno}: not UTF-8 text ({err.reason})") from None
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep:
            raise ReleaseError(
                f"{CHECKSUMS} in {path!r}, line {lineno}: expected '<sha256 hex digest>  <relative path>' "
                f"(two spaces between), got {line[:120]!r}"
            )
        digest = digest.lower()
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise ReleaseError(
                f"{CHECKSUMS} in {path!r}, line {lineno}: {digest[:80]!r} is not a sha256 hex digest (64 hex digits)"
            )
        _check_entry(rel, lineno, path)
        if rel in listed:
            raise ReleaseError(f"{CHECKSUMS} in {path!r}, line {lineno}: entry {rel!r} is listed twice (first on line {first_line[rel]})")
        listed[rel], first_line[rel] = digest, lineno
    return listed


def read_config(path: str | os.PathLike) -> dict:
    """Parses the bundle's ``config.json`` (without verifying checksums).

    Raises FileNotFoundError if it is missing, ReleaseError (naming config.json and the
    JSON error's line, column and character) if it is not a JSON object."""
    path = os.path.abspath(os.fspath(path))
    full = os.path.join(path, CONFIG)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"release bundle {path!r} is missing {CONFIG}")
    try:
        with open(full, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise ReleaseError(
            f"{CONFIG} in {path!r} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno} (char {err.pos})"
        ) from None
    except UnicodeDecodeError as err:
        raise ReleaseError(f"{CONFIG} in {path!r} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    except RecursionError:
        raise ReleaseError(f"{CONFIG} in {path!r} is nested too deeply to parse") from None
    if not isinstance(meta, dict):
        raise ReleaseError(f"{CONFIG} in {path!r} must hold a JSON object, got {type(meta).__name__}")
    return meta


def not_a_bundle(path: str) -> str | None:
    """Why the existing, non-empty directory ``path`` is not a release bundle that
    ``save_pretrained(..., overwrite=True)`` may replace; None if it is one."""
    entries = sorted(os.listdir(path))
    if CONFIG not in entries:
        return f"it has no {CONFIG}, so it is not a mnemax release bundle"
    try:
        meta = read_config(path)
    except (OSError, ReleaseError) as err:
        return f"its {CONFIG} is not a release bundle's ({err})"
    if meta.get("format") not in FORMATS:
        return f"its {CONFIG} has format {meta.get('format')!r}, not one of {FORMATS}, so it is not a mnemax release bundle"
    others = [e for e in entries if e not in BUNDLE_ENTRIES]
    if others:
        return f"it holds files that save_pretrained does not write: {others[:5]}"
    return None


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

    ``path`` must not exist or be an empty directory. ``overwrite=True`` also replaces an
    earlier release bundle there (a directory whose config.json has this release format
    and that holds only bundle files); any other directory or file is refused with a
    ReleaseError that says why, and nothing in it is touched.
    """
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    from .version import __version__

    path = os.path.abspath(os.fspath(path))
    if not hasattr(model, "config"):
        raise ValueError(f"model must be a zoo model with a .config, got {type(model).__name__}")
    replace = _check_target(path, overwrite)
    plain = nn.meta.unbox(params)
    expected = nn.meta.unbox(abstract_params(model))
    _check_fits(expected, plain, "params")
    main = jax.process_index() == 0
    if main and replace:
        _clear_bundle(path)
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
        with open(os.path.join(path, CONFIG), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(_model_card(model, plain, extra, __version__))
        with open(os.path.join(path, CHECKSUMS), "w") as f:
            for rel in bundle_files(path):
                f.write(f"{sha256_file(os.path.join(path, rel))}  {rel}\n")
    multihost_utils.sync_global_devices("mnemax.save_pretrained:done")
    return path


def _check_target(path: str, overwrite: bool) -> bool:
    """Refuses a ``path`` that save_pretrained may not write to; True if it holds an
    earlier bundle to be replaced."""
    if not os.path.lexists(path):
        return False
    if not os.path.isdir(path):
        raise ReleaseError(f"cannot write a release bundle to {path!r}: it exists and is not a directory")
    if not os.listdir(path):
        return False
    reason = not_a_bundle(path)
    if reason is not None:
        raise ReleaseError(
            f"refusing to write a release bundle to {path!r}: the directory is not empty and {reason}. "
            "overwrite=True replaces only an earlier release bundle or an empty directory; choose another path"
        )
    if not overwrite:
        raise ReleaseError(f"path {path!r} exists and is not empty: it holds a release bundle (pass overwrite=True to replace it)")
    return True


def _clear_bundle(path: str) -> None:
    """Removes the entries of a bundle that _check_target accepted (bundle entries only;
    links are unlinked, never followed)."""
    import shutil

    for name in sorted(os.listdir(path)):
        if name not in BUNDLE_ENTRIES:  # appeared since the check: leave it and fail
            raise ReleaseError(f"refusing to replace the release bundle at {path!r}: {name!r} appeared in it")
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)


def verify(path: str | os.PathLike) -> dict:
    """Checks a bundle's files against its checksums; returns the parsed config.json.

    Order: the checksums file is parsed and every entry checked to be a relative path
    inside the bundle; the bundle's files are listed (refusing links that leave it); the
    two sets must be equal; only then is each file hashed and compared."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"release bundle {path!r} does not exist")
    for name in (CHECKSUMS, CONFIG):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"release bundle {path!r} is missing {name}")
    listed = read_checksums(path)
    present = set(bundle_files(path))
    for rel in sorted(set(listed) - present):
        if os.path.lexists(os.path.join(path, rel)):
            raise ReleaseError(f"{CHECKSUMS} in {path!r} lists {rel!r}, which is not a file of the bundle it can verify")
        raise FileNotFoundError(f"release bundle {path!r} is missing {rel} (listed in {CHECKSUMS})")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise ReleaseError(f"files not covered by {CHECKSUMS} in {path!r}: {unlisted[:5]}")
    real_root = os.path.realpath(path)
    for rel, digest in sorted(listed.items()):
        full = os.path.join(path, rel)
        if not _inside(os.path.realpath(full), real_root):  # checked above; kept next to the read
            raise ReleaseError(f"{CHECKSUMS} in {path!r}: entry {rel!r} leads outside the bundle")
        if sha256_file(full) != digest:
            raise ReleaseError(f"checksum mismatch for {rel} in {path!r}: the file was altered or truncated")
    meta = read_config(path)
    if meta.get("format") not in FORMATS:
        raise ReleaseError(f"config.json format is {meta.get('format')!r}, expected one of {FORMATS}")
    return meta


def _check_fits(expected, actual, what: str) -> None:
    """Raises ReleaseError unless ``actual`` has ``expected``'s leaves, shapes and dtypes
    (a parameter in another dtype than the config builds would be cast silently on load)."""
    exp = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(actual)}
    missing, unexpected = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    common = sorted(set(exp) & set(got))
    wrong = [k for k in common if tuple(np.shape(got[k])) != tuple(exp[k].shape)]
    wrong_dtype = [k for k in common if k not in wrong and hasattr(got[k], "dtype")
                   and np.dtype(got[k].dtype) != np.dtype(exp[k].dtype)]
    if missing or unexpected or wrong or wrong_dtype:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(f"{k}: {tuple(np.shape(got[k]))} vs config {tuple(exp[k].shape)}"
                                                     for k in wrong[:3]))
        if wrong_dtype:
            parts.append("wrong dtypes " + ", ".join(f"{k}: {np.dtype(got[k].dtype)} vs config {np.dtype(exp[k].dtype)}"
                                                     for k in wrong_dtype[:3])
                         + f" ({len(wrong_dtype)} leaves; build the model with the params' param_dtype, or cast the params)")
        raise ReleaseError(f"{what} do not fit the config: " + "; ".join(parts))


def _block_of(meta: dict, path: str) -> tuple[dict, str, dict]:
    """(config, family name, block options) of a parsed config.json, checked to be objects."""
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ReleaseError(f"{CONFIG} in {path!r} has no 'config' object")
    family = config.get("family")
    if meta.get("family", family) != family:
        raise ReleaseError(f"{CONFIG} in {path!r}: 'family' is {meta.get('family')!r} but config.family is {family!r}")
    block = config.get("block", {})
    if not isinstance(block, dict):
        raise ReleaseError(f"{CONFIG} in {path!r}: config.block must be an object, got {type(block).__name__}")
    return config, family, block


def upgrade_v1(meta: dict, path: str = "<config.json>") -> dict:
    """A ``mnemax-release/1`` config.json (parsed) as ``mnemax-release/2``: block options the
    v1 table lacked take the family's defaults; an option the family does not have raises
    ReleaseError naming it. Other formats raise."""
    from .registry import get_family

    if meta.get("format") != FORMAT_V1:
        raise ReleaseError(f"{CONFIG} in {path!r}: upgrade_v1 converts format {FORMAT_V1!r}, got {meta.get('format')!r}")
    config, family_name, block = _block_of(meta, path)
    try:
        family = get_family(family_name)
    except ValueError as err:
        raise ReleaseError(f"{CONFIG} in {path!r} does not describe a valid model: {err}") from None
    defaults = family.config().to_dict()
    unknown = sorted(set(block) - set(defaults))
    if unknown:
        raise ReleaseError(
            f"{CONFIG} in {path!r} does not describe a valid model: unknown block option(s) {unknown} for family "
            f"{family_name!r} ({family.config.__name__}); its options are {sorted(defaults)}"
        )
    return {**meta, "format": FORMAT, "config": {**config, "block": {**defaults, **block}}}


def config_from_meta(meta: dict, path: str = "<config.json>"):
    """The :class:`ModelConfig` of a parsed config.json of any of :data:`FORMATS` (v1 via
    :func:`upgrade_v1`). A v2 block must hold every option of the family's config class
    and no other; every error is a ReleaseError naming the file and the field."""
    from .config import ModelConfig
    from .registry import get_family

    if meta.get("format") == FORMAT_V1:
        meta = upgrade_v1(meta, path)
    elif meta.get("format") != FORMAT:
        raise ReleaseError(f"{CONFIG} in {path!r}: format {meta.get('format')!r} is not one of {FORMATS}")
    config, family_name, block = _block_of(meta, path)
    try:
        options = get_family(family_name).config.option_names()
        missing, unknown = sorted(set(options) - set(block)), sorted(set(block) - set(options))
        if unknown:
            raise ValueError(
                f"unknown block option(s) {unknown} for family {family_name!r}; its options are {sorted(options)}"
            )
        if missing:
            raise ValueError(f"config.block lacks option(s) {missing} of family {family_name!r}")
        return ModelConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as err:
        raise ReleaseError(f"{CONFIG} in {path!r} does not describe a valid model: {err}") from None


def load_pretrained(path: str | os.PathLike, mesh=None, *, rules=None):
    """Loads a release bundle: returns ``(model, params)``.

    Verifies checksums (see :func:`verify`: nothing outside the bundle is read),
    rebuilds the model from ``config.json``, checks the stored parameter shapes against
    it, and restores onto ``mesh`` (a ``jax.sharding.Mesh`` with some of the axes
    ``data``/``fsdp``/``tensor``) or onto the default device.
    """
    import orbax.checkpoint as ocp

    from .registry import build
    from .sharding import RULES, tree_shardings

    meta = verify(path)
    path = os.path.abspath(os.fspath(path))
    config = config_from_meta(meta, path)
    model = build(config)
    boxed = abstract_params(model)
    expected = nn.meta.unbox(boxed)
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir) or os.path.islink(params_dir):
        raise FileNotFoundError(f"release bundle {path!r} is missing its params/ directory")
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
