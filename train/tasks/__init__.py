"""Memory tasks: seeded synthetic TFDS builders and the adapter for real TFDS datasets.

``open_task(name, params, ...)`` returns a :class:`TaskData`-ready object with a
``spec()`` and a random-access ``source(split)`` for ``split`` in {"train", "test"}.
"""

from __future__ import annotations

import dataclasses
import os

from .base import DatasetConfig, Task, TaskBuilder, TaskSpec
from .listops import ListOps, ListopsTask
from .mqar import MQAR, Mqar
from .passkey import Passkey, PasskeyTask
from .recall import RecallAfterDistractors, RecallTask
from .selective_copying import SelectiveCopying, SelectiveCopyingTask
from .spiking_adding import SpikingAdding, SpikingAddingTask
from .tfds_adapter import TfdsTask

BUILDERS: dict[str, type[TaskBuilder]] = {
    "mqar": Mqar,
    "selective_copying": SelectiveCopyingTask,
    "passkey": PasskeyTask,
    "listops": ListopsTask,
    "recall": RecallTask,
    "spiking_adding": SpikingAddingTask,
}
TASK_NAMES = tuple(BUILDERS) + ("tfds",)


def make_task(name: str, **params) -> Task:
    """The pure-Python task (generator, oracle) of a synthetic task."""
    if name not in BUILDERS:
        raise ValueError(f"task.name: unknown task {name!r}; tasks are {TASK_NAMES}")
    return BUILDERS[name].TASK(**params)


class SyntheticSource:
    """A prepared synthetic dataset: ``spec()`` and ``source(split)``."""

    def __init__(self, builder: TaskBuilder):
        self.builder = builder
        self.task = builder.task

    def spec(self) -> TaskSpec:
        return self.task.spec()

    def source(self, split: str):
        return self.builder.as_data_source(split=split)


def open_task(name: str, params: dict, *, num_train: int, num_test: int, seed: int, data_dir: str, prepare: bool = True):
    """Builds (if needed, and ``prepare``) and opens a task's dataset in ``data_dir``."""
    params = dict(params)
    if name == "tfds":
        return TfdsTask(data_dir=params.pop("data_dir", data_dir), **params)
    if name not in BUILDERS:
        raise ValueError(f"task.name: unknown task {name!r}; tasks are {TASK_NAMES}")
    if num_train < 1 or num_test < 1:
        raise ValueError(f"task.num_train and task.num_test must be >= 1, got {num_train}, {num_test}")
    ds = DatasetConfig(params=params, num_train=num_train, num_test=num_test, seed=seed)
    builder = BUILDERS[name](dataset=ds, data_dir=os.fspath(data_dir), file_format="array_record")
    if prepare and not builder.is_prepared():
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return SyntheticSource(builder)


__all__ = [
    "BUILDERS",
    "DatasetConfig",
    "ListOps",
    "MQAR",
    "Passkey",
    "RecallAfterDistractors",
    "SelectiveCopying",
    "SpikingAdding",
    "TASK_NAMES",
    "Task",
    "TaskSpec",
    "TfdsTask",
    "make_task",
    "open_task",
]
