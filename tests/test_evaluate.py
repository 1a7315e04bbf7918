"""mnemax.train.evaluate: the dataset directory never comes from the bundle, a training
workdir resolves to its <workdir>/release, --batch_size is used and validated; the
metrics are held to the model applied to the test split and scored in numpy."""

import glob
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import mnemax
from mnemax.release import example_inputs
from mnemax.train import tasks as tasks_lib
from mnemax.train.evaluate import check_batch_size, evaluate_release, find_release
from mnemax.train.trainer import model_config

from .trainer_utils import ROOT, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training workdir laid out as the trainer leaves it (config.json, release/) with an
    untrained tiny MQAR transformer whose bundle records task.data_dir = <tmp>/recorded."""
    tmp = tmp_path_factory.mktemp("evaluate")
    recorded = tmp / "recorded"
    recorded.mkdir()
    config = tiny_config(str(recorded), **{"task.num_train": 16, "task.num_test": 20})
    task = config.task.to_dict()
    spec = tasks_lib.make_task(task["name"], **task["params"]).spec()
    mcfg = model_config(config, spec)
    model = mnemax.build(mcfg)
    params = nn.meta.unbox(model.init(jax.random.key(3), example_inputs(mcfg)))
    workdir = tmp / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))  # the trainer's, not a bundle's
    mnemax.save_pretrained(str(workdir / "release"), model, params, extra={"task": task, "trained_steps": 0})
    return {"tmp": tmp, "recorded": str(recorded), "workdir": str(workdir), "release": str(workdir / "release"),
            "model": model, "params": params, "task": task}


def reference_metrics(run, data_dir):
    """eval_loss / eval_accuracy of the model on the whole test split, in numpy."""
    t = run["task"]
    src = tasks_lib.open_task(t["name"], t["params"], num_train=t["num_train"], num_test=t["num_test"], seed=t["seed"],
                              data_dir=data_dir).source("test")
    ex = [src[i] for i in range(len(src))]
    inputs, targets, mask = (np.stack([e[k] for e in ex]) for k in ("inputs", "targets", "mask"))
    assert inputs.shape[0] == t["num_test"] == 20
    logits, _ = run["model"].apply(run["params"], inputs)
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return {"eval_loss": (nll * mask).sum() / mask.sum(),
            "eval_accuracy": ((logits.argmax(-1) == targets) & mask).sum() / mask.sum()}


def test_data_dir_never_comes_from_the_bundle(run, tmp_path, monkeypatch):
    with open(os.path.join(run["release"], "config.json")) as f:
        assert json.load(f)["extra"]["task"]["data_dir"] == run["recorded"]
    given = tmp_path / "given"
    result = evaluate_release(run["release"], data_dir=str(given), batch_size=8)
    assert os.listdir(run["recorded"]) == [], "evaluate wrote into the bundle's recorded data_dir"
    assert glob.glob(str(given / "mqar" / "c*" / "1.0.0" / "*test*")), os.listdir(given)
    ref = reference_metrics(run, str(given))
    np.testing.assert_allclose(result["eval_loss"], ref["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(result["eval_accuracy"], ref["eval_accuracy"], rtol=1e-6)

    # No data_dir: $MNEMAX_DATA_DIR, still not the bundle's.
    env_dir = tmp_path / "from_env"
    monkeypatch.setenv("MNEMAX_DATA_DIR", str(env_dir))
    again = evaluate_release(run["release"], batch_size=8)
    assert os.listdir(run["recorded"]) == []
    assert glob.glob(str(env_dir / "mqar" / "c*" / "1.0.0" / "*test*")), "dataset not generated under $MNEMAX_DATA_DIR"
    assert again == pytest.approx(result, rel=1e-6)
    with pytest.raises(ValueError, match="data_dir"):
        evaluate_release(run["release"], data_dir="")


def test_batch_size_is_used_and_validated(run, tmp_path):
    data_dir = str(tmp_path / "data")
    ref = reference_metrics(run, data_dir)
    default = evaluate_release(run["release"], data_dir=data_dir)  # 256: one batch padded with 236 masked rows
    for batch_size in (8, 3, 20):  # 20 = num_test: no padding; 3 and 8 pad the last batch
        result = evaluate_release(run["release"], data_dir=data_dir, batch_size=batch_size)
        np.testing.assert_allclose(result["eval_accuracy"], default["eval_accuracy"], rtol=1e-6)
        np.testing.assert_allclose(result["eval_loss"], default["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(default["eval_loss"], ref["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(default["eval_accuracy"], ref["eval_accuracy"], rtol=1e-6)
    for bad in (0, -4, 2.5, True, "8", None):
        with pytest.raises(ValueError, match="batch_size"):
            evaluate_release(run["release"], data_dir=data_dir, batch_size=bad)
    assert check_batch_size(np.int64(16)) == 16


def test_workdir_resolves_to_its_release(run, tmp_path):
    data_dir = str(tmp_path / "data")
    assert find_release(run["workdir"]) == run["release"]
    assert find_release(run["release"]) == run["release"]
    from_workdir = evaluate_release(run["workdir"], data_dir=data_dir, batch_size=8)
    from_bundle = evaluate_release(run["release"], data_dir=data_dir, batch_size=8)
    assert from_workdir == pytest.approx(from_bundle, rel=1e-6)
    np.testing.assert_allclose(from_workdir["eval_loss"], reference_metrics(run, data_dir)["eval_loss"], rtol=1e-5)

    # A workdir without a bundle (release.write=False): the error names both paths checked.
    bare = tmp_path / "bare_run"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"task": {"name": "mqar"}}))
    with pytest.raises(FileNotFoundError) as err:
        evaluate_release(str(bare), data_dir=data_dir)
    assert str(bare) in str(err.value) and os.path.join(str(bare), "release") in str(err.value)
    assert "<workdir>/release" in str(err.value)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        evaluate_release(str(tmp_path / "nope"), data_dir=data_dir)
    assert os.listdir(run["recorded"]) == []


def test_command_line(run, tmp_path):
    data_dir = str(tmp_path / "data")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "mnemax.train.evaluate", f"--release={run['workdir']}"]
    out = subprocess.run([*cmd, f"--data_dir={data_dir}", "--batch_size=8"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"release bundle: {run['release']}" in out.stdout
    printed = dict(re.findall(r"^(eval_\w+): ([0-9.]+)$", out.stdout, re.M))
    ref = reference_metrics(run, data_dir)
    np.testing.assert_allclose(float(printed["eval_loss"]), ref["eval_loss"], atol=6e-5)
    np.testing.assert_allclose(float(printed["eval_accuracy"]), ref["eval_accuracy"], atol=6e-5)
    assert os.listdir(run["recorded"]) == []
    bad = subprocess.run([*cmd, f"--data_dir={data_dir}", "--batch_size=0"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--batch_size" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_long_sequences_stream_in_time_chunks(run, tmp_path):
    """time_chunk runs each sequence in pieces with the state carried: the metrics equal one
    call per sequence and the numpy reference (seq_len 32 in pieces of 5: 7 pieces, the last short)."""
    data_dir = str(tmp_path / "data")
    ref = reference_metrics(run, data_dir)
    for chunk in (5, 32, None):
        got = evaluate_release(run["release"], data_dir=data_dir, batch_size=8, time_chunk=chunk)
        np.testing.assert_allclose(got["eval_loss"], ref["eval_loss"], rtol=1e-5)
        np.testing.assert_allclose(got["eval_accuracy"], ref["eval_accuracy"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"time_chunk: must be a positive integer, got 0"):
        evaluate_release(run["release"], data_dir=data_dir, time_chunk=0)


def test_evaluate_at_4096_steps_compiles_under_2_gb():
    """The MQAR Transformer (window 128) evaluated at seq_len 4096 with the default batch (256):
    the step evaluate compiles (a time_chunk = 1024-step piece with the state carried, the
    attention in query blocks) needs under 2 GB of temporaries (compiled, not run). One call over
    all 4096 steps needs 2.18 GB on the CPU (the MLP's buffers; the dense attention needed ~70 GB:
    tests/test_attention_blocks.py)."""
    import jax.numpy as jnp

    from mnemax.train.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_TIME_CHUNK, chunk_step

    model = mnemax.create("transformer-tiny", d_model=64, n_layers=2, num_heads=2, window=128, key_conv=4, vocab_size=128)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    b, t = DEFAULT_BATCH_SIZE, min(DEFAULT_TIME_CHUNK, 4096)
    piece = {"inputs": jax.ShapeDtypeStruct((b, t), jnp.int32), "targets": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "mask": jax.ShapeDtypeStruct((b, t), jnp.float32), "group": jax.ShapeDtypeStruct((b,), jnp.int32)}
    state = jax.eval_shape(lambda p, x: model.apply(p, x)[1], params, piece["inputs"])
    step = chunk_step(model, groups=1)
    for s in (None, state):  # a sequence's first piece, and the pieces after it
        temp = step.lower(params, s, piece).compile().memory_analysis().temp_size_in_bytes
        assert temp < 2e9, f"{temp / 1e9:.2f} GB"
