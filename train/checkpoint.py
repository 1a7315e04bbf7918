"""Orbax checkpoints of the train state, with the run's config beside it.

``Checkpointer`` wraps an async ``orbax.checkpoint.CheckpointManager`` (keep-N, save
every N steps). A checkpoint is committed atomically (orbax writes to a temporary
directory and renames it), so a run killed mid-save leaves the previous checkpoint
intact. Once a save has committed, a manifest of the sha256 of every file in it
(``<step>/manifest.sha256``) is written beside them (before the next save starts, and
on ``wait``/``close``).

``restore_latest`` restores the newest good checkpoint onto the shardings of the given
abstract state -- any mesh or device count. A checkpoint is bad when a file differs from
its manifest (same size or not: flipped bytes are found), when orbax cannot read it, or
when ``accept(state)`` rejects what was restored (the trainer rejects non-finite values).
A bad checkpoint is reported in one line naming the step and the file; if an earlier one
is good, the bad ones are moved aside as ``corrupt-<step>-<time>`` and the good one is
restored. If none is good, :class:`CheckpointCorruptError` is raised and nothing is moved,
unless ``restart_if_corrupt`` (then they are moved aside and None is returned: start over).
A checkpoint committed just before a kill may have no manifest yet; it is restored
unverified (orbax's own checks and ``accept`` still apply).
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from mnemax.release import sha256_file


MANIFEST = "manifest.sha256"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit this run's state (another model or optimizer)."""


class CheckpointCorruptError(RuntimeError):
    """No checkpoint in the directory passes its content check."""


def _step_files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str) -> None:
    """``<step_dir>/manifest.sha256``: "<sha256>  <relative path>" for every file, written atomically."""
    lines = [f"{sha256_file(os.path.join(step_dir, rel))}  {rel}\n" for rel in _step_files(step_dir)]
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> str | None:
    """None if every file matches the manifest (or there is no manifest yet: "unverified" is
    not "corrupt"); else what is wrong, naming the file."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    want = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            digest, sep, rel = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64:
                return f"{MANIFEST} line {number} is malformed"
            want[rel] = digest
    have = set(_step_files(step_dir))
    for rel in sorted(set(want) - have):
        return f"{rel} is missing"
    for rel in sorted(have - set(want)):
        return f"{rel} is not in the manifest"
    for rel, digest in sorted(want.items()):
        if sha256_file(os.path.join(step_dir, rel)) != digest:
            return f"{rel} does not match its sha256 in the manifest"
    return None


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
        self._unmanifested: set[int] = set()
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=use_async,
                create=True,
            ),
        )

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state, config: dict, *, force: bool = False) -> bool:
        if not force and not self.should_save(step):
            return False
        if step in self.manager.all_steps():
            return False
        self.wait()  # the previous save has committed: write its manifest before the next one starts
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
            force=True,
        )
        if saved:
            self._unmanifested.add(step)
        return saved

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _check_compatible(self, step: int, abstract_state) -> None:
        """A checkpoint written for another model or optimizer is an error, not corruption."""
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore attempt decides
            return
        if meta is None:
            return
        saved = sorted(tuple(getattr(m, "shape", ()) or ()) for m in jax.tree.leaves(meta))
        want = sorted(tuple(a.shape) for a in jax.tree.leaves(abstract_state))
        if saved != want:
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} holds {len(saved)} arrays that do not match the "
                f"{len(want)} of this run's model and optimizer: was it written with another config? "
                "(use another --workdir, or the config in its config.json)"
            )

    def restore_latest(self, abstract_state, *, accept=None, restart_if_corrupt: bool = False):
        """Returns ``(step, state, config)`` of the newest good checkpoint, or None when there is
        none (see the module docstring; ``accept(state) -> bool`` vetoes a restored state)."""
        bad: list[int] = []
        for step in reversed(self.steps()):
            self._check_compatible(step, abstract_state)
            problem = verify_manifest(os.path.join(self.directory, str(step)))
            if problem is None:
                try:
                    out = self.manager.restore(
                        step,
                        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()),
                    )
                except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
                    if "tree structures do not match" in str(err):
                        raise CheckpointMismatchError(
                            f"the checkpoint at step {step} in {self.directory} was written for another model or "
                            f"optimizer: {str(err)[:500]}"
                        ) from None
                    problem = f"orbax cannot read it ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                else:
                    if accept is None or accept(out["state"]):
                        for b in bad:
                            self._quarantine(b)
                        return step, out["state"], out["config"]
                    problem = "it holds non-finite values"
            logging.error("checkpoint at step %d is unreadable: %s", step, problem)
            print(f"checkpoint at step {step} is unreadable: {problem}; trying an earlier one", flush=True)
            bad.append(step)
        if not bad:
            return None
        if restart_if_corrupt:
            for b in bad:
                self._quarantine(b)
            print(f"no good checkpoint in {self.directory}; starting over (checkpoint.restart_if_corrupt)", flush=True)
            return None
        raise CheckpointCorruptError(
            f"no checkpoint in {self.directory} is good (steps {sorted(bad)}, each reported above); nothing was "
            "restored or moved. Set --config.checkpoint.restart_if_corrupt=True to move them aside and train "
            "from step 0, or use another --workdir"
        )

    def _quarantine(self, step: int) -> None:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(os.path.dirname(self.directory), f"corrupt-{step}-{int(time.time())}")
        if jax.process_index() == 0 and os.path.isdir(src):
            shutil.move(src, dst)
        multihost_utils.sync_global_devices(f"mnemax:quarantine-{step}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending saves have committed, then writes their manifests."""
        self.manager.wait_until_finished()
        if not self._unmanifested:
            return
        if jax.process_index() == 0:
            for step in sorted(self._unmanifested):  # only this run's saves: never bless an older file
                step_dir = os.path.join(self.directory, str(step))
                if os.path.isdir(step_dir):  # (the keep-N policy may already have deleted it)
                    write_manifest(step_dir)
        self._unmanifested.clear()
        multihost_utils.sync_global_devices("mnemax:manifests")

    def close(self) -> None:
        self.wait()
        self.manager.close()
