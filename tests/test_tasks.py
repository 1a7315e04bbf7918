"""TFDS task builders: built offline into a temp dir, deterministic for a seed, solvable
by a hand-written oracle (100%) and not by a bag-of-tokens baseline."""

import numpy as np
import pytest

from mnemax.train import tasks

SMALL = {
    "mqar": {"seq_len": 48, "num_pairs": 6, "vocab_size": 40},
    "selective_copying": {"seq_len": 40, "num_tokens": 6, "data_vocab": 6},
    "passkey": {"seq_len": 64, "key_len": 4},
    "listops": {"seq_len": 64, "max_depth": 3, "max_args": 4},
    "recall": {"seq_len": 80, "num_dancers": 4},
    "spiking_adding": {"num_channels": 16, "bins_per_digit": 24, "burst": 3},
}


def _open(tmp_path, name, seed=0, n_train=300, n_test=150):
    return tasks.open_task(name, SMALL[name], num_train=n_train, num_test=n_test, seed=seed, data_dir=str(tmp_path))


def _all(source):
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_builder_deterministic_and_oracle_solves(tmp_path, name):
    a = _open(tmp_path / "a", name)
    b = _open(tmp_path / "b", name)
    c = _open(tmp_path / "c", name, seed=1)
    ea, eb, ec = (_all(x.source("test")) for x in (a, b, c))
    assert len(ea) == 150
    for x, y in zip(ea, eb):
        for k in ("inputs", "targets", "mask", "group"):
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))
    assert any(not np.array_equal(np.asarray(x["inputs"]), np.asarray(y["inputs"])) for x, y in zip(ea, ec)), "the seed changes nothing"
    # files are array_record, read back through data_source (random access)
    assert list((tmp_path / "a").rglob("*.array_record*")), "no array_record files written"
    task = a.task
    spec = task.spec()
    for ex in ea:
        x = np.asarray(ex["inputs"])
        assert x.shape[0] == spec.seq_len and np.asarray(ex["mask"]).any()
        if spec.vocab_size:
            assert x.min() >= 0 and x.max() < spec.vocab_size
        pred = task.oracle(ex)
        m = np.asarray(ex["mask"])
        np.testing.assert_array_equal(pred[m], np.asarray(ex["targets"])[m])
        assert np.asarray(ex["targets"])[m].max() < spec.num_outputs


def _bag_dataset(task, examples):
    feats, labels = [], []
    for ex in examples:
        for t in np.flatnonzero(np.asarray(ex["mask"])):
            feats.append(task.bag_features(ex, int(t)))
            labels.append(int(np.asarray(ex["targets"])[t]))
    return np.stack(feats), np.array(labels)


def _softmax_regression(x, y, classes, steps=400, lr=0.5):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    w = np.zeros((x.shape[1], classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x)
        w -= lr * (x.T @ g + 1e-3 * w)
        b -= lr * g.sum(0)
    return lambda q: np.argmax(((q - mu) / sd) @ w + b, axis=1)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bag_of_tokens_baseline_does_not_solve(tmp_path, name):
    src = _open(tmp_path, name, n_train=600, n_test=200)
    task = src.task
    xtr, ytr = _bag_dataset(task, _all(src.source("train")))
    xte, yte = _bag_dataset(task, _all(src.source("test")))
    predict = _softmax_regression(xtr, ytr, task.spec().num_outputs)
    train_acc = float((predict(xtr) == ytr).mean())
    acc = float((predict(xte) == yte).mean())
    print(f"{name}: bag-of-tokens train {train_acc:.3f} test {acc:.3f}")
    assert acc < 0.6, f"{name}: a bag-of-tokens classifier reaches {acc:.2f} held-out accuracy"


def test_task_validation_names_fields():
    with pytest.raises(ValueError, match=r"task\.seq_len"):
        tasks.make_task("mqar", seq_len=10, num_pairs=8)
    with pytest.raises(ValueError, match=r"task\.num_pairs"):
        tasks.make_task("mqar", num_pairs=100, vocab_size=16)
    with pytest.raises(ValueError, match=r"task\.depth"):
        tasks.make_task("passkey", depth=1.5)
    with pytest.raises(ValueError, match=r"task\.bogus"):
        tasks.make_task("listops", bogus=1)
    with pytest.raises(ValueError, match=r"task\.name"):
        tasks.make_task("nope")


def test_passkey_depth_and_groups():
    task = tasks.make_task("passkey", seq_len=64, key_len=3, depth=0.0, depth_buckets=4)
    ex = task.example("test", 0, seed=0)
    assert np.asarray(ex["inputs"])[0] == 1 and int(ex["group"]) == 0  # needle at the very start
    task = tasks.make_task("passkey", seq_len=64, key_len=3, depth=1.0, depth_buckets=4)
    ex = task.example("test", 0, seed=0)
    x = np.asarray(ex["inputs"])
    assert x[64 - 3 - 5] == 1 and int(ex["group"]) == 3  # needle just before the query


def test_listops_values_by_hand():
    from mnemax.train.tasks.listops import evaluate

    assert evaluate("MAX", [4, 3, 2, 1, 0]) == 4
    assert evaluate("MIN", [4, 3, 9]) == 3
    assert evaluate("MED", [4, 1, 9, 7]) == 4  # lower middle of 1 4 7 9
    assert evaluate("SM", [9, 8, 7]) == 4
    task = tasks.make_task("listops", seq_len=16)
    # [MAX 4 3 [MIN 2 3 ] 1 0 ] = 4, left-padded, '=' last
    toks = [11, 5, 4, 12, 3, 4, 15, 2, 1, 15]
    x = np.zeros(16, np.int32)
    x[15 - len(toks) : 15] = toks
    x[15] = 16
    ex = {"inputs": x, "mask": np.eye(16, dtype=bool)[15], "targets": np.zeros(16, np.int32)}
    assert task.oracle(ex)[15] == 1 + 4


@pytest.mark.parametrize("name", ["mqar", "selective_copying", "passkey", "listops", "recall", "spiking_adding"])
def test_every_task_config_validates(name):
    """Each configs/<task>.py builds a model that fits its task for every family it lists
    (no compile, no data; the model is built and its parameter shapes traced)."""
    import importlib

    import jax

    import mnemax
    from mnemax.train.trainer import validate

    module = importlib.import_module(f"mnemax.configs.{name}")
    for family in module.FAMILIES:
        resolved = validate(module.get_config(family), num_devices=jax.device_count())
        spec, cfg = resolved["spec"], resolved["model_config"]
        assert spec.name == name and cfg.outputs == spec.num_outputs, family
        assert cfg.family == mnemax.get_config(module.FAMILIES[family][0]).family, family
        tokens = np.zeros((1, spec.seq_len), np.int32) if spec.vocab_size else np.zeros((1, spec.seq_len, cfg.input_dim), np.float32)
        jax.eval_shape(mnemax.build(cfg).init, jax.random.key(0), tokens)
