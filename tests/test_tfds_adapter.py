"""The TFDS adapter task (``task.name=tfds``) on small TFDS datasets built in a temp dir.

Two ``GeneratorBasedBuilder`` datasets are written with ``file_format="array_record"`` (as
a prepared ``tfds build`` leaves them): a text one (``kind="bytes"``) and an image
classification one (``kind="pixels"``, an ``image`` tensor of H x W x 2 channels and a
``label``). The trainer runs a few steps on each, and

* every row of every training batch it reads equals the record the documented order
  names (row ``r`` of step ``s`` is example ``s * batch + r`` of
  ``grain.MapDataset.source(train).shuffle(seed).repeat()``), converted here by the
  rules of tfds_adapter.py's docstring (bytes: token ``b + 1``, targets the next token, mask where the
  next byte exists; pixels: pixel ``t`` is ``image[t // W, t % W]`` / 255, the label at the
  last step only), from the texts / images this file generated;
* each epoch visits every record once; the evaluation batches are the test split in
  order, the padded rows masked out;
* the first step's logged loss and accuracy equal numpy on the initial parameters' logits
  of the recorded first batch, and the final held-out metrics equal numpy on the released
  model's logits of the whole test split.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import mnemax
from mnemax.configs.base import base_config
from mnemax.train.trainer import Trainer

from . import trainer_utils

T_BYTES = 16  # seq_len of the bytes task
H, W, C, CLASSES = 3, 4, 2, 3  # pixels task: 12 steps of 2 channels
N_TRAIN, N_TEST = 20, 7
BATCH, EVAL_BATCH, STEPS, SEED = 8, 3, 4, 5  # 32 rows: one epoch of 20 and 12 of the next; eval pads 7 -> 9

ALPHABET = list("abcdefghij") + ["é", "ü", "€"]  # multi-byte UTF-8 too (bytes up to 0xe2)


def make_text(split: str, i: int) -> str:
    """Record ``i`` of a split: a unique prefix, then a body whose UTF-8 length spans the cases
    (shorter than seq_len + 1: padded and masked; exactly seq_len and seq_len + 1; longer: cut)."""
    prefix = f"{split[:2]}{i:02d}|"  # 5 bytes
    exact = {1: T_BYTES, 2: T_BYTES + 1, 3: T_BYTES - 1}
    if split == "train" and i in exact:
        return prefix + "x" * (exact[i] - len(prefix))
    rng = np.random.default_rng([ord(split[1]), i])
    return prefix + "".join(rng.choice(ALPHABET, size=int(rng.integers(0, 22))))


def make_image(split: str, i: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([7, ord(split[1]), i])
    image = rng.integers(0, 256, (H, W, C)).astype(np.uint8)
    image[0, 0, 0] = i  # unique per split: the record's id
    image[0, 0, 1] = 0 if split == "train" else 1
    return image, int(rng.integers(0, CLASSES))


COUNTS = {"train": N_TRAIN, "test": N_TEST}


class MnemaxAdapterTestText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # generated, nothing downloaded: no checksums file to look up

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in COUNTS}

    def _generate_examples(self, split):
        for i in range(COUNTS[split]):
            yield i, {"text": make_text(split, i)}


class MnemaxAdapterTestDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            # a Tensor, not tfds.features.Image (its PNG codec needs TensorFlow); the adapter reads .shape
            "image": tfds.features.Tensor(shape=(H, W, C), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=CLASSES),
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in COUNTS}

    def _generate_examples(self, split):
        for i in range(COUNTS[split]):
            image, label = make_image(split, i)
            yield i, {"image": image, "label": label}


# ----------------------------------------------------------------------------- the rules, by hand


def expected_bytes(text: str) -> dict:
    data = text.encode("utf-8")
    inputs, targets, mask = np.zeros(T_BYTES, np.int32), np.zeros(T_BYTES, np.int32), np.zeros(T_BYTES, bool)
    for t in range(T_BYTES):
        inputs[t] = data[t] + 1 if t < len(data) else 0
        targets[t] = data[t + 1] + 1 if t + 1 < len(data) else 0
        mask[t] = t + 1 < len(data)
    return {"inputs": inputs, "targets": targets, "mask": mask, "group": np.int32(0)}


def expected_pixels(image: np.ndarray, label: int) -> dict:
    steps = H * W
    inputs = np.zeros((steps, C), np.float32)
    for t in range(steps):
        for c in range(C):
            inputs[t, c] = np.float32(image[t // W, t % W, c]) / np.float32(255.0)
    targets, mask = np.zeros(steps, np.int32), np.zeros(steps, bool)
    targets[-1], mask[-1] = label, True
    return {"inputs": inputs, "targets": targets, "mask": mask, "group": np.int32(0)}


KINDS = {
    "bytes": {"builder": MnemaxAdapterTestText, "params": {"kind": "bytes", "seq_len": T_BYTES}},
    "pixels": {"builder": MnemaxAdapterTestDigits, "params": {"kind": "pixels"}},
}


def written(kind: str, split: str) -> dict:
    """id -> the record this file generated (the id is recoverable from the stored record)."""
    if kind == "bytes":
        return {make_text(split, i): make_text(split, i) for i in range(COUNTS[split])}
    return {i: make_image(split, i) for i in range(COUNTS[split])}


def record_id(kind: str, record):
    if kind == "bytes":
        text = record["text"]
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return int(np.asarray(record["image"])[0, 0, 0])


def expected_row(kind: str, rec) -> dict:
    return expected_bytes(rec) if kind == "bytes" else expected_pixels(*rec)


# ----------------------------------------------------------------------------- numpy metrics


def np_metrics(logits, targets, mask) -> dict:
    """Mean nll and accuracy over the masked steps (the per-step loops of trainer_utils)."""
    sums = trainer_utils.np_metrics(np.asarray(logits), np.asarray(targets), np.asarray(mask), None, 0)
    return {"loss": sums["nll"] / sums["count"], "accuracy": sums["correct"] / sums["count"], "count": sums["count"]}


# ----------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    tfds.disable_progress_bar()
    for spec in KINDS.values():
        spec["builder"](data_dir=str(d), file_format="array_record").download_and_prepare()
    return str(d)


def _config(kind: str, data_dir: str):
    c = base_config()
    c.seed = SEED
    c.model.preset = "transformer-tiny"
    c.task.name = "tfds"
    c.task.params = {"name": KINDS[kind]["builder"].name, **KINDS[kind]["params"]}
    c.task.data_dir = data_dir
    c.task.num_train, c.task.num_test = 1, 1  # not used by a tfds task (its splits are what they are)
    c.train.steps, c.train.batch_size = STEPS, BATCH
    c.train.learning_rate, c.train.warmup_steps = 3e-3, 1
    c.eval.every_steps, c.eval.batch_size = 0, EVAL_BATCH
    c.checkpoint.every_steps, c.checkpoint.use_async = 0, False
    c.log.every_steps, c.log.progress_bar, c.log.tensorboard, c.log.console = 1, False, False, False
    c.mesh.num_devices = 1
    return c


@pytest.fixture(scope="module", params=sorted(KINDS))
def run(request, data_dir, tmp_path_factory):
    """Trains STEPS steps on the kind's dataset, recording what the feeder hands the train step and
    the evaluation, and the parameters the first step starts from."""
    kind = request.param
    workdir = str(tmp_path_factory.mktemp(f"run-{kind}"))
    trainer = Trainer(_config(kind, data_dir), workdir)
    train_rows, eval_batches, first_params = {}, [], []
    feeder = trainer.feeder
    read_train, read_eval, train_step = feeder.train_batch_local, feeder.eval_batches, trainer.train_step

    def spy_train(step):
        batch = read_train(step)
        train_rows[step] = {k: np.array(v) for k, v in batch.items()}
        return batch

    def spy_eval(*args, **kwargs):
        for batch in read_eval(*args, **kwargs):
            eval_batches.append({k: np.asarray(v) for k, v in batch.items()})
            yield batch

    def spy_step(state, batch, nonfinite):
        if not first_params:  # copied before the call: the step donates its state
            first_params.append(jax.tree.map(np.array, state.params))
        return train_step(state, batch, nonfinite)

    feeder.train_batch_local, feeder.eval_batches, trainer.train_step = spy_train, spy_eval, spy_step
    result = trainer.fit().metrics
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {"kind": kind, "trainer": trainer, "result": result, "records": records, "workdir": workdir,
            "train_rows": train_rows, "eval_batches": eval_batches, "first_params": first_params[0]}


def _raw(kind: str, data_dir: str, split: str):
    """The stored records, in the data source's order (what ``as_data_source`` gives back)."""
    source = tfds.builder(KINDS[kind]["builder"].name, data_dir=data_dir).as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def _assert_row(got: dict, want: dict, where: str):
    for k in ("inputs", "targets", "mask", "group"):
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.shape == w.shape, f"{where} {k}: shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype or (k == "mask" and g.dtype.kind == "b"), f"{where} {k}: dtype {g.dtype} != {w.dtype}"
        np.testing.assert_array_equal(g, w, err_msg=f"{where} {k}")


def test_the_stored_records_are_the_ones_written(data_dir):
    for kind in KINDS:
        for split in COUNTS:
            ids = [record_id(kind, r) for r in _raw(kind, data_dir, split)]
            assert sorted(ids) == sorted(written(kind, split)), (kind, split)


def test_spec_follows_the_dataset(run):
    spec = run["trainer"].spec
    got = (spec.seq_len, spec.head, spec.num_outputs, spec.vocab_size, spec.input_dim)
    if run["kind"] == "bytes":  # bytes 0..255 as tokens 1..256, 0 the padding
        assert got == (T_BYTES, "lm", 257, 257, None)
    else:
        assert got == (H * W, "classify", CLASSES, None, C)
    cfg = run["trainer"].model_config
    assert cfg.head == spec.head and cfg.outputs == spec.num_outputs


def test_training_batches_are_the_records_in_the_documented_order(run, data_dir):
    import grain

    kind = run["kind"]
    raw = _raw(kind, data_dir, "train")
    records = written(kind, "train")
    order = grain.MapDataset.range(len(raw)).shuffle(seed=SEED).repeat()  # the documented stream of indices
    assert sorted(s for s in run["train_rows"] if s < STEPS) == list(range(STEPS))
    seen_ids = []
    for step in range(STEPS):
        batch = run["train_rows"][step]
        assert batch["inputs"].shape[0] == BATCH
        for r in range(BATCH):
            rec = raw[order[step * BATCH + r]]
            seen_ids.append(record_id(kind, rec))
            want = expected_row(kind, records[record_id(kind, rec)])
            _assert_row({k: v[r] for k, v in batch.items()}, want, f"{kind} step {step} row {r}")
    # every epoch visits every record once, in a new order
    first, second = seen_ids[:N_TRAIN], seen_ids[N_TRAIN:]
    assert sorted(first) == sorted(records) and len(set(second)) == len(second)
    assert first[: len(second)] != second, "the second epoch repeats the first one's order"
    if kind == "bytes":  # the edge cases were read: a padded row, a cut one, exact lengths
        masks = [run["train_rows"][s]["mask"][r].sum() for s in range(STEPS) for r in range(BATCH)]
        assert min(masks) < T_BYTES - 1 and max(masks) == T_BYTES


def test_evaluation_reads_the_test_split_in_order_once(run, data_dir):
    kind = run["kind"]
    raw = _raw(kind, data_dir, "test")
    records = written(kind, "test")
    batches = run["eval_batches"]
    assert len(batches) == -(-N_TEST // EVAL_BATCH)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    for i, rec in enumerate(raw):
        want = expected_row(kind, records[record_id(kind, rec)])
        _assert_row({k: v[i] for k, v in rows.items()}, want, f"{kind} test {i}")
    assert not rows["mask"][N_TEST:].any(), "padded evaluation rows are scored"


def _logits(trainer, params, inputs):
    out, _ = jax.jit(trainer.model.apply)({"params": params}, jnp.asarray(inputs))
    return np.asarray(out)


def test_first_step_metrics_equal_numpy_on_the_initial_parameters(run):
    batch = run["train_rows"][0]
    ref = np_metrics(_logits(run["trainer"], run["first_params"], batch["inputs"]), batch["targets"], batch["mask"])
    step1 = next(r for r in run["records"] if r["step"] == 1 and "loss" in r)
    np.testing.assert_allclose(step1["loss"], ref["loss"], rtol=2e-5)
    np.testing.assert_allclose(step1["accuracy"], ref["accuracy"], rtol=1e-6, atol=1e-7)
    assert step1["nonfinite_steps"] == 0


def test_held_out_metrics_equal_numpy_on_the_released_model(run, data_dir):
    kind = run["kind"]
    records = written(kind, "test")
    rows = [expected_row(kind, records[record_id(kind, r)]) for r in _raw(kind, data_dir, "test")]
    inputs, targets, mask = (np.stack([r[k] for r in rows]) for k in ("inputs", "targets", "mask"))
    model, params = mnemax.load_pretrained(os.path.join(run["workdir"], "release"))
    assert model.config == run["trainer"].model_config
    pairs = zip(jax.tree.leaves(params["params"]), jax.tree.leaves(run["first_params"]))
    assert not all(np.array_equal(a, b) for a, b in pairs), "training changed no parameter"
    ref = np_metrics(np.asarray(jax.jit(model.apply)(params, jnp.asarray(inputs))[0]), targets, mask)
    assert ref["count"] == (mask.sum() if kind == "bytes" else N_TEST)
    final = [r for r in run["records"] if "eval_loss" in r]
    assert [r["step"] for r in final] == [STEPS]
    for got in (run["result"], final[0]):
        np.testing.assert_allclose(got["eval_loss"], ref["loss"], rtol=2e-5)
        np.testing.assert_allclose(got["eval_accuracy"], ref["accuracy"], rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in run["records"] if "loss" in r] == list(range(1, STEPS + 1))
