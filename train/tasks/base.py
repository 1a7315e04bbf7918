"""Synthetic memory tasks as TFDS builders.

A task is a seeded generator of examples, each a dict of numpy arrays::

    inputs:  (seq_len,) int32 tokens, or (seq_len, input_dim) features
    targets: (seq_len,) int32   the answer expected at each step (0 where unused)
    mask:    (seq_len,) bool    True at the steps that are scored
    group:   () int32           a bucket for per-group accuracy (e.g. needle depth), 0 if none

Every task is scored the same way: cross-entropy and accuracy of the model's
per-step outputs at the masked steps. A task also has a hand-written ``oracle`` (it
must solve the task exactly) and ``bag_features`` (the order-free view a bag-of-
tokens baseline gets), which the tests use to show the task is solvable and not
trivially so.

Each task is wrapped in a TFDS ``GeneratorBasedBuilder`` (``file_format=
'array_record'``) whose builder config holds the task's parameters, so a dataset is
generated locally, once, into ``data_dir`` and read back with ``as_data_source``
(random access, no TensorFlow). Example ``i`` of a split is drawn from
``numpy.random.default_rng([seed, split_id, i])``: the data depend only on the
parameters and the seed.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

SPLITS = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a model needs to know about a task's data."""

    name: str
    seq_len: int
    num_outputs: int  # width of the output layer: vocabulary (LM head) or classes
    head: str  # "lm" (tokens in, tokens out) or "classify" (outputs are class ids)
    vocab_size: int | None = None  # token inputs
    input_dim: int | None = None  # feature inputs
    group_names: tuple[str, ...] = ()  # names of the values of `group`, if any

    def model_overrides(self) -> dict[str, Any]:
        """ModelConfig fields that make a zoo model fit this task."""
        if self.head == "lm":
            return {"vocab_size": self.vocab_size, "input_dim": None, "head": "lm"}
        return {
            "vocab_size": self.vocab_size,
            "input_dim": self.input_dim,
            "head": "classify",
            "num_classes": self.num_outputs,
            "tie_embeddings": False,
        }


class Task(abc.ABC):
    """Base class: subclasses set ``name``, ``Params`` and implement ``spec``, ``generate``
    and ``oracle``."""

    name: ClassVar[str]
    Params: ClassVar[type]

    def __init__(self, **params):
        fields = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(f"task.{unknown[0]}: unknown option of task {self.name!r}; options are {sorted(fields)}")
        self.params = self.Params(**params)
        self.validate()

    # -- to implement -------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field (``task.<field>``) for impossible parameters."""

    @abc.abstractmethod
    def spec(self) -> TaskSpec:
        """Shapes and vocabulary of the task's data."""

    @abc.abstractmethod
    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One example drawn with ``rng``."""

    @abc.abstractmethod
    def oracle(self, example: dict[str, np.ndarray]) -> np.ndarray:
        """Predicted targets (seq_len,) from the inputs alone, by the task's rule."""

    def bag_features(self, example: dict[str, np.ndarray], step: int) -> np.ndarray:
        """The order-free view of the inputs before ``step`` plus the input at ``step``:
        token counts (or per-channel sums) concatenated with the current input."""
        x = np.asarray(example["inputs"])
        spec = self.spec()
        if x.ndim == 1:
            counts = np.bincount(x[:step], minlength=spec.vocab_size).astype(np.float32)
            current = np.zeros(spec.vocab_size, np.float32)
            current[x[step]] = 1
        else:
            counts = x[:step].sum(0).astype(np.float32)
            current = x[step].astype(np.float32)
        return np.concatenate([counts, current])

    # -- shared ---------------------------------------------------------------------------
    def example(self, split: str, index: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, SPLITS[split], index])
        ex = self.generate(rng)
        ex.setdefault("group", np.int32(0))
        return ex

    def features(self) -> tfds.features.FeaturesDict:
        spec = self.spec()
        if spec.input_dim is None:
            inputs = tfds.features.Tensor(shape=(spec.seq_len,), dtype=np.int32)
        else:
            inputs = tfds.features.Tensor(shape=(spec.seq_len, spec.input_dim), dtype=self.input_dtype)
        return tfds.features.FeaturesDict(
            {
                "inputs": inputs,
                "targets": tfds.features.Tensor(shape=(spec.seq_len,), dtype=np.int32),
                "mask": tfds.features.Tensor(shape=(spec.seq_len,), dtype=np.bool_),
                "group": tfds.features.Tensor(shape=(), dtype=np.int32),
            }
        )

    input_dtype: ClassVar[Any] = np.float32


def check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ValueError(f"task.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Task parameters plus dataset size and seed: everything that defines a dataset."""

    params: dict
    num_train: int
    num_test: int
    seed: int

    def name(self) -> str:
        blob = json.dumps({"p": self.params, "n": [self.num_train, self.num_test], "s": self.seed}, sort_keys=True)
        return "c" + hashlib.sha1(blob.encode()).hexdigest()[:16]


class TaskBuilderConfig(tfds.core.BuilderConfig):
    def __init__(self, dataset: DatasetConfig, **kwargs):
        super().__init__(name=dataset.name(), description=json.dumps(dataclasses.asdict(dataset), sort_keys=True), **kwargs)
        self.dataset = dataset


class TaskBuilder(tfds.core.GeneratorBasedBuilder):
    """A TFDS builder for one task; the config carries the task's parameters."""

    VERSION = tfds.core.Version("1.0.0")
    TASK: ClassVar[type[Task]]
    # The data are generated, not downloaded: no checksums file to look up next to the
    # code (TFDS would import the optional `importlib_resources` to find it).
    code_path = None

    def __init__(self, *, dataset: DatasetConfig, **kwargs):
        self.task = self.TASK(**dataset.params)
        super().__init__(config=TaskBuilderConfig(dataset), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"mnemax synthetic task {self.TASK.name}: {self.builder_config.description}",
            features=self.task.features(),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        ds = self.builder_config.dataset
        return {"train": self._generate_examples("train", ds.num_train), "test": self._generate_examples("test", ds.num_test)}

    def _generate_examples(self, split: str, count: int):
        seed = self.builder_config.dataset.seed
        for i in range(count):
            yield i, self.task.example(split, i, seed)
