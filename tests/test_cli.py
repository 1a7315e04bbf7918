"""The command line: progress bar, metrics.jsonl, TensorBoard events, eval, checkpoints
and a release bundle that evaluates to the run's own held-out numbers."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
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


# one block option per family that the task configs' tables leave at the preset's value
FIELD_OF_EVERY_FAMILY = {
    "transformer": ("transformer-tiny", "mlp_ratio", 3.0),
    "lssl": ("lssl-tiny", "state_size", 16),
    "s4d": ("s4d-tiny", "state_size", 16),
    "mamba": ("mamba-tiny", "d_conv", 2),
    "memmamba": ("memmamba-tiny", "pool_dim", 24),
    "hopfield": ("hopfield-tiny", "mlp_ratio", 3.0),
    "hcam": ("hcam-tiny", "key_size", 8),
    "elm": ("elm-tiny", "mlp_num_layers", 2),
    "xlstm": ("xlstm-tiny", "proj_factor", 3.0),
    "xlstm_large": ("xlstm-7b", "qk_dim_factor", 0.25),
    "mamba2": ("mamba2-tiny", "d_state", 8),
    "gated_deltanet": ("gdn-tiny", "expand_v", 2.0),
    "gla": ("gla-tiny", "expand_v", 2.0),
    "retnet": ("retnet-tiny", "expand_v", 1.0),
    "lightning": ("lightning-tiny", "head_dim", 16),
    "deltanet": ("deltanet-tiny", "expand_v", 2.0),
    "kda": ("kda-tiny", "expand_v", 2.0),
}


@pytest.mark.parametrize("family", sorted(FIELD_OF_EVERY_FAMILY))
def test_any_block_field_of_every_family_is_overridable(family):
    """``model.overrides`` lists every field of the family (not only the config table's), and
    setting one -- as --config.model.overrides.<field>=<value> does -- reaches the model: the
    resolved config holds it and the parameter count changes."""
    import mnemax
    from mnemax.configs.base import apply_family, base_config
    from mnemax.train import tasks as tasks_lib
    from mnemax.train.trainer import model_config

    assert set(FIELD_OF_EVERY_FAMILY) == set(mnemax.list_families())
    preset, field, value = FIELD_OF_EVERY_FAMILY[family]
    small = {"d_model": 32, "n_layers": 2} if family != "elm" else {}
    if family == "xlstm_large":
        small.update(num_heads=2, chunk_size=8)
    c = apply_family(base_config(), {family: (preset, small)}, family)
    assert field in c.model.overrides and set(mnemax.get_family(mnemax.get_config(preset).family).block_keys) <= set(c.model.overrides)
    task = ("spiking_adding", {}) if family == "elm" else ("mqar", {"seq_len": 32, "num_pairs": 4, "vocab_size": 32})
    spec = tasks_lib.make_task(task[0], **task[1]).spec()

    def count(cfg):
        shapes = jax.eval_shape(mnemax.build(cfg).init, jax.random.key(0), mnemax.release.example_inputs(cfg))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    before = model_config(c, spec)
    c.model.overrides[field] = value
    after = model_config(c, spec)
    assert after.block[field] == value and before.block[field] != value
    assert count(after) != count(before)


def test_an_unknown_override_lists_the_valid_fields(tmp_path):
    proc = cli(str(tmp_path / "run"), str(tmp_path / "data"), "--config.model.overrides.mlp_ratioo=2.0")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, out
    assert "--config.model.overrides.mlp_ratioo: no such field" in out and "'mlp_ratio'" in out and "'window'" in out, out
