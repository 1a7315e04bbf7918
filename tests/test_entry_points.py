"""The shipped entry point ``python -m mnemax.train.evaluate`` runs as a subprocess on the
release of a tiny training run (the ``mnemax-bench`` console script is run as a subprocess
by tests/test_bench_memory.py, on the whole smoke benchmark).

Its numbers are held to independent ones: the model of the bundle applied here to the
task's test split and scored in numpy (the cross-entropy and argmax accuracy at the
masked steps), not through the trainer's ``masked_metrics``.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import mnemax
from mnemax.train.trainer import Trainer

from .trainer_utils import ROOT, held_out_split, numpy_metrics, tiny_config

NUM_TEST = 30  # not a multiple of any batch below: the last batch is padded


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MQAR Transformer trained 5 steps in this process, with its release bundle."""
    tmp = tmp_path_factory.mktemp("entry_points")
    config = tiny_config(str(tmp / "train_data"), **{
        "release.write": True, "task.num_test": NUM_TEST, "mesh.num_devices": 1, "checkpoint.use_async": False,
    })
    result = Trainer(config, str(tmp / "run")).fit().metrics
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
