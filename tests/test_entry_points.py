"""The shipped entry points run as subprocesses: ``python -m mnemax.train.evaluate`` on the
release of a tiny training run, and the ``mnemax-bench`` console script on one small cell.

Their numbers are held to independent ones: the model of the bundle (or of the bench
cell's checkpoint) applied here to the task's test split and scored in numpy (the
cross-entropy and argmax accuracy at the masked steps), not through the trainer's
``masked_metrics``.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import mnemax
from mnemax.train import tasks as tasks_lib
from mnemax.train.trainer import Trainer

from .trainer_utils import ROOT, tiny_config

NUM_TEST = 30  # not a multiple of any batch below: the last batch is padded


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def numpy_metrics(logits, targets, mask) -> dict:
    """Mean cross-entropy and argmax accuracy over the masked steps, in float64 numpy."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    m = np.asarray(mask, bool)
    hits = np.argmax(np.asarray(logits), -1) == np.asarray(targets)
    return {"eval_loss": float(nll[m].sum() / m.sum()), "eval_accuracy": float(hits[m].sum() / m.sum()),
            "count": int(m.sum()), "all_steps_accuracy": float(hits.mean())}


def held_out_split(task: dict, data_dir: str):
    """(inputs, targets, mask) of a task's whole test split, in order."""
    src = tasks_lib.open_task(task["name"], task["params"], num_train=task["num_train"], num_test=task["num_test"],
                              seed=task["seed"], data_dir=data_dir).source("test")
    ex = [src[i] for i in range(len(src))]
    return tuple(np.stack([np.asarray(e[k]) for e in ex]) for k in ("inputs", "targets", "mask"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MQAR Transformer trained 5 steps in this process, with its release bundle."""
    tmp = tmp_path_factory.mktemp("entry_points")
    config = tiny_config(str(tmp / "train_data"), **{
        "release.write": True, "task.num_test": NUM_TEST, "mesh.num_devices": 1, "checkpoint.use_async": False,
    })
    result = Trainer(config, str(tmp / "run")).run()
    return {"tmp": tmp, "workdir": str(tmp / "run"), "release": str(tmp / "run" / "release"), "result": result}


def test_evaluate_module_matches_numpy_on_the_bundle(trained):
    data_dir = str(trained["tmp"] / "eval_data")  # a fresh directory: the test split is regenerated there
    cmd = [sys.executable, "-m", "mnemax.train.evaluate", f"--release={trained['workdir']}", f"--data_dir={data_dir}",
           "--batch_size=7", "--time_chunk=12"]  # 32 steps in pieces of 12, 12, 8; 30 rows in 5 batches
    out = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"release bundle: {trained['release']}" in out.stdout and f"data_dir: {data_dir}" in out.stdout
    printed = {k: float(v) for k, v in re.findall(r"^(eval_[\w/]+): (-?[0-9.]+)$", out.stdout, re.M)}
    assert set(printed) == {"eval_loss", "eval_accuracy"}, out.stdout

    # independent: the bundle's model on the test split, scored in numpy (one call per sequence)
    model, params = mnemax.load_pretrained(trained["release"])
    with open(os.path.join(trained["release"], "config.json")) as f:
        task = json.load(f)["extra"]["task"]
    inputs, targets, mask = held_out_split(task, data_dir)
    assert inputs.shape == (NUM_TEST, 32) and 0 < mask.sum() < mask.size
    ref = numpy_metrics(jax.jit(model.apply)(params, inputs)[0], targets, mask)
    # the printed numbers have 4 decimals
    np.testing.assert_allclose(printed["eval_loss"], ref["eval_loss"], rtol=0, atol=5.1e-5)
    np.testing.assert_allclose(printed["eval_accuracy"], ref["eval_accuracy"], rtol=0, atol=5.1e-5)
    # ... and are the training run's own final held-out numbers (its batches of 8, one call each)
    np.testing.assert_allclose(printed["eval_loss"], trained["result"]["eval_loss"], rtol=0, atol=5.1e-5)
    np.testing.assert_allclose(printed["eval_accuracy"], trained["result"]["eval_accuracy"], rtol=0, atol=5.1e-5)
    # the masked steps are a small part of the sequence: scoring every step would be far off
    assert abs(ref["all_steps_accuracy"] - ref["eval_accuracy"]) > 1e-3


def _bench_exe() -> str:
    exe = shutil.which("mnemax-bench", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if not exe:
        pytest.fail("the mnemax-bench console script is not installed next to this interpreter "
                    f"({os.path.dirname(sys.executable)}); run `pip install -e .` (pyproject.toml [project.scripts])")
    return exe


def test_bench_console_script_rows_and_accuracies(tmp_path):
    exe = _bench_exe()
    out_dir, work, data_dir = tmp_path / "out", tmp_path / "work", tmp_path / "data"
    cmd = [exe, "memory", "--smoke", "--budget", "tiny", "--families", "transformer", "--tasks", "mqar",
           "--difficulties", "pairs=4", "--out", str(out_dir), "--workdir", str(work), "--data_dir", str(data_dir)]
    out = subprocess.run(cmd, env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

    # the JSON holds exactly the row asked for
    doc = json.loads((out_dir / "memory_tiny_smoke.json").read_text())
    assert (doc["budget"], doc["smoke"], doc["steps"]) == ("tiny", True, None)
    rows = doc["rows"]
    assert [(r["family"], r["task"], r["difficulty"]) for r in rows] == [("transformer", "mqar", "pairs=4")], rows
    row = rows[0]
    assert "error" not in row and row["steps"] == 3 and 0.0 <= row["accuracy"] <= 1.0

    # the row printed on stdout and the markdown table say what the JSON says
    printed = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["accuracy"] == round(row["accuracy"], 4)
    table = (out_dir / "memory_tiny_smoke.md").read_text()
    assert table.splitlines()[0] == "| family | params | mqar pairs=4 |"
    body = [line for line in table.splitlines() if line.startswith("| transformer |")]
    assert body == [f"| transformer | {row['params']:,}-{row['params']:,} | {row['accuracy']:.3f} |"], table
    assert table.strip() in out.stdout

    # independent: the cell's trained parameters (its last checkpoint) on its test split, in numpy
    cells = [d for d in os.listdir(work) if d.endswith("-transformer-mqar-pairs4")]
    assert len(cells) == 1, os.listdir(work)
    cell = work / cells[0]
    config = json.loads((cell / "config.json").read_text())
    task = config["task"]
    assert task["params"]["num_pairs"] == 4
    spec = tasks_lib.make_task(task["name"], **task["params"]).spec()
    model = mnemax.create(config["model"]["preset"], **{**config["model"]["overrides"], **spec.model_overrides()})
    assert model.config.d_model == row["d_model"]
    assert mnemax.release.count_params(mnemax.release.abstract_params(model)) == row["params"]
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        state = ck.restore(str(cell / "checkpoints" / "3" / "state"))
    inputs, targets, mask = held_out_split(task, task["data_dir"])
    assert inputs.shape[0] == task["num_test"] == 32
    ref = numpy_metrics(jax.jit(model.apply)({"params": state["params"]}, inputs)[0], targets, mask)
    np.testing.assert_allclose(row["accuracy"], ref["eval_accuracy"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(row["loss"], ref["eval_loss"], rtol=2e-5)
