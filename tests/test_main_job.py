"""The README's main job, verbatim: reaches >= 90% held-out recall and leaves a release
bundle that evaluates to the same accuracy. Slow (minutes): run with -m slow."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from mnemax.train.evaluate import evaluate_release
from mnemax.train.metrics import read_metrics

from .trainer_utils import ROOT, flag_overrides


def readme_block(marker: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, marker
    return m.group(1).strip()


@pytest.mark.slow
def test_readme_main_job(tmp_path):
    cmd = shlex.split(readme_block("main-command"))
    assert cmd[:3] == ["python", "-m", "mnemax.train"]
    cmd = [sys.executable] + cmd[1:]
    cmd = [a.replace("runs/mqar", str(tmp_path / "runs" / "mqar")) for a in cmd]
    env = dict(os.environ, MNEMAX_DATA_DIR=str(tmp_path / "data"), XLA_FLAGS="")
    out = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=1800)  # not the clone
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    workdir = str(tmp_path / "runs" / "mqar")
    final = [r for r in read_metrics(workdir) if "eval_accuracy" in r][-1]
    assert final["eval_accuracy"] >= 0.9, final
    again = evaluate_release(os.path.join(workdir, "release"), data_dir=str(tmp_path / "data"))
    assert abs(again["eval_accuracy"] - final["eval_accuracy"]) < 1e-6


def test_readme_main_command_runs_outside_the_clone(tmp_path):
    """The README's main command, verbatim, from a directory that is not the clone (its
    --config names a config shipped in the package), shrunk by the tiny flags: it trains,
    evaluates and writes the release bundle."""
    cmd = shlex.split(readme_block("main-command"))
    assert cmd[:3] == ["python", "-m", "mnemax.train"] and any(a.startswith("--config=") and ".py" not in a for a in cmd)
    cmd = [sys.executable] + cmd[1:] + flag_overrides(**{"release.write": True})
    env = dict(os.environ, MNEMAX_DATA_DIR=str(tmp_path / "data"), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    workdir = tmp_path / "runs" / "mqar"
    assert (workdir / "release" / "checksums.sha256").exists()
    assert [r["step"] for r in read_metrics(str(workdir)) if "loss" in r] == [1, 2, 3, 4, 5]
