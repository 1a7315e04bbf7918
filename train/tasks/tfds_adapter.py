"""Real TFDS datasets through the same path as the synthetic tasks.

A dataset the user has prepared (``tfds build mnist`` or an earlier download) is read
with ``as_data_source`` and each record is turned into the task format
(inputs, targets, mask, group):

* ``kind="pixels"``: an image classification dataset (``image``, ``label``), e.g.
  mnist or cifar10, read as a sequence of pixels (sequential MNIST): inputs
  ``(H*W, C)`` scaled to [0, 1], the label is the target at the last step.
* ``kind="bytes"``: a text dataset (``text``), e.g. lm1b, as UTF-8 bytes for
  next-byte prediction: token ``b + 1`` for byte ``b``, 0 is padding, truncated or
  padded to ``seq_len``.

``seq_len`` may not exceed what the records hold for ``pixels`` (H * W).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from .base import TaskSpec, check


@dataclasses.dataclass(frozen=True)
class TfdsParams:
    name: str = "mnist"
    kind: str = "pixels"  # "pixels" | "bytes"
    seq_len: int | None = None  # pixels: H*W (the default); bytes: required
    train_split: str = "train"
    test_split: str = "test"


class TfdsTask:
    """Adapter from a prepared TFDS dataset to the task format (see module docstring)."""

    name = "tfds"

    def __init__(self, data_dir: str | None = None, **params):
        fields = {f.name for f in dataclasses.fields(TfdsParams)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(f"task.{unknown[0]}: unknown option of task 'tfds'; options are {sorted(fields)}")
        self.params = p = TfdsParams(**params)
        check(p.kind in ("pixels", "bytes"), "kind", f"must be 'pixels' or 'bytes', got {p.kind!r}")
        try:
            self.builder = tfds.builder(p.name, data_dir=data_dir)
        except Exception as err:  # noqa: BLE001 - tfds raises several types for unknown names
            raise ValueError(f"task.name: no TFDS dataset {p.name!r} ({err})") from None
        if not self.builder.is_prepared():
            raise ValueError(
                f"task.name: TFDS dataset {p.name!r} is not prepared in {self.builder.data_dir!r}; "
                f"prepare it first (e.g. `tfds build {p.name}`) or point task.data_dir at it"
            )
        feats = self.builder.info.features
        if p.kind == "pixels":
            check("image" in feats and "label" in feats, "kind", f"'pixels' needs image and label features; {p.name!r} has {sorted(feats)}")
            h, w, c = feats["image"].shape
            self.native_len, self.channels = h * w, c
            self.num_classes = feats["label"].num_classes
            seq = p.seq_len or self.native_len
            check(seq <= self.native_len, "seq_len", f"{p.name!r} images hold {self.native_len} pixels; seq_len={seq} is too long for the task")
            check(seq == self.native_len, "seq_len", f"'pixels' reads whole images: seq_len must be {self.native_len}, got {seq}")
            self.seq_len = seq
        else:
            check("text" in feats, "kind", f"'bytes' needs a text feature; {p.name!r} has {sorted(feats)}")
            check(p.seq_len is not None and p.seq_len >= 2, "seq_len", f"'bytes' needs seq_len >= 2, got {p.seq_len}")
            self.seq_len = p.seq_len

    def spec(self) -> TaskSpec:
        if self.params.kind == "pixels":
            return TaskSpec("tfds:" + self.params.name, self.seq_len, num_outputs=self.num_classes, head="classify", input_dim=self.channels)
        return TaskSpec("tfds:" + self.params.name, self.seq_len, num_outputs=257, head="lm", vocab_size=257)

    def source(self, split: str):
        split_name = self.params.train_split if split == "train" else self.params.test_split
        return _Converted(self.builder.as_data_source(split=split_name), self)

    def convert(self, record) -> dict[str, np.ndarray]:
        T = self.seq_len
        if self.params.kind == "pixels":
            x = np.asarray(record["image"], np.float32).reshape(-1, self.channels) / 255.0
            targets = np.zeros(T, np.int32)
            targets[-1] = int(record["label"])
            mask = np.zeros(T, bool)
            mask[-1] = True
            return {"inputs": x, "targets": targets, "mask": mask, "group": np.int32(0)}
        text = record["text"]
        data = np.frombuffer(text if isinstance(text, bytes) else str(text).encode(), np.uint8)[: T + 1]
        tokens = np.zeros(T + 1, np.int32)
        tokens[: len(data)] = data.astype(np.int32) + 1
        mask = np.zeros(T, bool)
        mask[: max(len(data) - 1, 0)] = True
        return {"inputs": tokens[:T], "targets": tokens[1:], "mask": mask, "group": np.int32(0)}


class _Converted:
    """Random-access view of a data source with records converted to the task format."""

    def __init__(self, source, task: TfdsTask):
        self.source, self.task = source, task

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.task.convert(self.source[i])
