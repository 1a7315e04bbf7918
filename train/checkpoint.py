"""Orbax checkpoints of the train state, with the run's config beside it.

``Checkpointer`` wraps an async ``orbax.checkpoint.CheckpointManager`` (keep-N, save
every N steps). A checkpoint is committed atomically (orbax writes to a temporary
directory and renames it), so a run killed mid-save leaves the previous checkpoint
intact. ``restore_latest`` restores the newest checkpoint onto the shardings of the
given abstract state -- any mesh or device count -- and if that checkpoint cannot
be read (truncated or corrupted files) it reports the failure, moves the directory
aside as ``corrupt-<step>`` and tries the one before.
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit this run's state (another model or optimizer)."""


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
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
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
            force=True,
        )

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

    def restore_latest(self, abstract_state):
        """Returns ``(step, state, config)`` of the newest readable checkpoint, or None."""
        for step in reversed(self.steps()):
            self._check_compatible(step, abstract_state)
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()),
                )
                return step, out["state"], out["config"]
            except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
                if "tree structures do not match" in str(err):
                    raise CheckpointMismatchError(
                        f"the checkpoint at step {step} in {self.directory} was written for another model or "
                        f"optimizer: {str(err)[:500]}"
                    ) from None
                logging.error("checkpoint at step %d could not be restored (%s: %s); trying an earlier one",
                              step, type(err).__name__, str(err)[:300])
                print(f"checkpoint at step {step} is unreadable ({type(err).__name__}); falling back to an earlier one", flush=True)
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(os.path.dirname(self.directory), f"corrupt-{step}-{int(time.time())}")
        if jax.process_index() == 0 and os.path.isdir(src):
            shutil.move(src, dst)
        multihost_utils.sync_global_devices(f"mnemax:quarantine-{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
