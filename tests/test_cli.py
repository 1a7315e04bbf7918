"""The command line: progress bar, metrics.jsonl, TensorBoard events, eval, checkpoints
and a release bundle that evaluates to the run's own held-out numbers."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mnemax
from mnemax.train import tasks as tasks_lib
from mnemax.train.evaluate import evaluate_release, parse_task_params
from mnemax.train.metrics import read_metrics

from .trainer_utils import cli, flag_overrides


def test_cli_run_outputs_and_release(tmp_path):
    data_dir, run = str(tmp_path / "data"), str(tmp_path / "run")
    flags = flag_overrides(**{
        "train.steps": 12, "eval.every_steps": 4, "checkpoint.every_steps": 4, "log.every_steps": 2,
        "log.progress_bar": True, "log.tensorboard": True, "log.console": True, "release.write": True,
    })
    proc = cli(run, data_dir, *flags)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "train:" in out and "step/s" in out and "loss=" in out, "no progress bar in the output"
    assert "step 4: eval_accuracy=" in out
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert all({"accuracy", "tokens_per_s", "grad_norm"} <= set(r) for r in train)
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))
    assert sorted(int(d) for d in os.listdir(os.path.join(run, "checkpoints")) if d.isdigit()) == [4, 8, 12]
    assert os.path.isfile(os.path.join(run, "config.json"))
    # The release bundle reproduces the final held-out numbers.
    model, params = mnemax.load_pretrained(os.path.join(run, "release"))
    assert model.config.block["key_conv"] == 4 and model.config.vocab_size == 32
    result = evaluate_release(os.path.join(run, "release"), data_dir=data_dir, batch_size=8)
    np.testing.assert_allclose(result["eval_accuracy"], evals[-1]["eval_accuracy"], rtol=1e-6)
    np.testing.assert_allclose(result["eval_loss"], evals[-1]["eval_loss"], rtol=1e-5)

    # At a longer context than trained (--task_param=seq_len=48): the same numbers as the
    # model applied to the regenerated test split, scored here in numpy.
    release = os.path.join(run, "release")
    longer = evaluate_release(release, data_dir=data_dir, batch_size=8, task_params={"seq_len": 48})
    with open(os.path.join(release, "config.json")) as f:
        task = json.load(f)["extra"]["task"]
    src = tasks_lib.open_task("mqar", {**task["params"], "seq_len": 48}, num_train=1, num_test=task["num_test"],
                              seed=task["seed"], data_dir=data_dir).source("test")
    ex = [src[i] for i in range(len(src))]
    inputs, targets, mask = (np.stack([e[k] for e in ex]) for k in ("inputs", "targets", "mask"))
    assert inputs.shape == (task["num_test"], 48)
    logits, _ = model.apply(params, inputs)
    acc = ((np.argmax(np.asarray(logits), -1) == targets) & mask).sum() / mask.sum()
    np.testing.assert_allclose(longer["eval_accuracy"], acc, rtol=1e-6)
    with pytest.raises(ValueError, match="task_params.*num_keys"):
        evaluate_release(release, data_dir=data_dir, task_params={"num_keys": 3})
    assert parse_task_params(["seq_len=48", "depth=0.5", "name=abc"]) == {"seq_len": 48, "depth": 0.5, "name": "abc"}
    with pytest.raises(ValueError, match="--task_param"):
        parse_task_params(["seq_len"])


def test_bad_config_on_the_command_line(tmp_path):
    proc = cli(str(tmp_path / "run"), str(tmp_path / "data"), *flag_overrides(**{"train.batch_size": 7}), devices=2)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "train.batch_size" in out, out


def test_nan_learning_rate_exits_nonzero_and_writes_nothing(tmp_path):
    """--config.train.learning_rate=nan (or inf) is refused before anything is written."""
    for value in ("nan", "inf"):
        work = tmp_path / f"run-{value}"
        proc = cli(str(work), str(tmp_path / "data"), *flag_overrides(**{"train.learning_rate": value, "release.write": True}))
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 2 and f"train.learning_rate: must be a finite number > 0, got {value}" in out, out
        assert not (work / "checkpoints").exists() and not (work / "release").exists()


def test_console_script_is_installed():
    exe = shutil.which("mnemax-train", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the mnemax-train console script is not installed"
    out = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--config and --workdir are required" in out.stdout + out.stderr
