"""Checkpoints: a run killed with SIGKILL after its first checkpoint resumes to exactly
the losses of an uninterrupted run (and records each step once); a corrupted latest
checkpoint -- truncated, or 64 bytes flipped at the same size -- is reported and the
previous one is used, reproducing the uninterrupted run's parameters bit for bit; with
every checkpoint corrupt the run stops with a short, clear error; resuming under a changed
config is an error naming the fields."""

import io
import json
import os
import shutil
import signal
import time
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.train.checkpoint import Checkpointer

from .trainer_utils import cli, flag_overrides, losses

STEPS = 40
FLAGS = flag_overrides(**{"train.steps": STEPS, "checkpoint.every_steps": 5, "checkpoint.keep": 3})


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def test_sigkill_resume_and_corrupt_fallback(tmp_path, data_dir):
    ref = str(tmp_path / "reference")
    _finish(cli(ref, data_dir, *FLAGS))
    want = losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1))

    run = str(tmp_path / "killed")
    proc = cli(run, data_dir, *FLAGS)
    ckpts = os.path.join(run, "checkpoints")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = max(losses(run)) if os.path.exists(os.path.join(run, "metrics.jsonl")) else 0
    assert done_before < STEPS, "killed too late to test resuming"

    out = _finish(cli(run, data_dir, *FLAGS))
    assert "resumed from the checkpoint at step" in out
    resumed_at = int(out.split("resumed from the checkpoint at step")[1].split()[0])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        loss_steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert loss_steps == list(range(1, STEPS + 1)), "metrics.jsonl must record each step once after a resume"
    got = losses(run)
    steps_after = [s for s in range(resumed_at + 1, STEPS + 1)]
    assert steps_after, "nothing was recomputed after resuming"
    np.testing.assert_array_equal([got[s] for s in steps_after], [want[s] for s in steps_after])

    # Corrupt the newest checkpoint (step 40): the trainer reports it, quarantines it and
    # resumes from step 35, reproducing the reference losses of steps 36..40.
    latest = os.path.join(ckpts, str(STEPS))
    victims = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(latest, "state")) for f in fs if "ocdbt" in d or "/d" in d]
    assert victims
    for v in victims:
        with open(v, "r+b") as f:
            f.truncate(max(os.path.getsize(v) // 3, 1))
    out = _finish(cli(run, data_dir, *FLAGS))
    assert f"checkpoint at step {STEPS} is unreadable" in out
    assert "resumed from the checkpoint at step 35" in out
    assert any(d.startswith(f"corrupt-{STEPS}-") for d in os.listdir(run))
    got = losses(run)
    np.testing.assert_array_equal([got[s] for s in range(36, STEPS + 1)], [want[s] for s in range(36, STEPS + 1)])


def test_checkpointer_falls_back_to_previous(tmp_path, capsys):
    ck = Checkpointer(str(tmp_path / "ck"), keep=3, every_steps=1, use_async=False)
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    states = {s: {"w": jnp.full((64, 64), float(s))} for s in (1, 2)}
    for s, st in states.items():
        ck.save(s, st, {"step": s})
    ck.wait()
    files = [os.path.join(d, f) for d, _, fs in os.walk(str(tmp_path / "ck" / "2" / "state")) for f in fs]
    for f in files:
        if os.path.getsize(f) > 100:
            with open(f, "r+b") as fh:
                fh.write(b"\x00garbage" * 8)
                fh.truncate(40)
    abstract = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=sh)}
    step, state, cfg = ck.restore_latest(abstract)
    assert step == 1 and cfg == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
    assert "checkpoint at step 2 is unreadable" in capsys.readouterr().out
    assert ck.steps() == [1]
    ck.close()


def test_checkpoint_of_another_model_is_an_error_not_corruption(tmp_path):
    from mnemax.train.checkpoint import CheckpointMismatchError

    ck = Checkpointer(str(tmp_path / "ck"), use_async=False)
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ck.save(1, {"w": jnp.ones((8, 8))}, {}, force=True)
    ck.wait()
    with pytest.raises(CheckpointMismatchError, match="step 1"):
        ck.restore_latest({"w": jax.ShapeDtypeStruct((4, 8), jnp.float32, sharding=sh)})
    with pytest.raises(CheckpointMismatchError):
        ck.restore_latest({"v": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sh)})
    assert ck.steps() == [1], "a mismatching checkpoint must not be moved aside"
    ck.close()


def test_a_checkpoint_beyond_train_steps_is_refused(tmp_path, data_dir):
    """A workdir that holds a longer run's checkpoint would train nothing and report that
    run's model as this one's (the memory benchmark did so when a workdir was reused)."""
    from mnemax.train.trainer import Trainer

    from .trainer_utils import tiny_config

    work = str(tmp_path / "run")
    first = Trainer(tiny_config(data_dir, **{"train.steps": 4}), work).fit()
    with pytest.raises(ValueError, match=r"train\.steps: .* step 4, beyond train\.steps=2"):
        Trainer(tiny_config(data_dir, **{"train.steps": 2}), work).fit()
    # the same length resumes at the end: no training, the same held-out numbers and state
    again = Trainer(tiny_config(data_dir, **{"train.steps": 4}), work).fit()
    np.testing.assert_allclose(again.metrics["eval_loss"], first.metrics["eval_loss"], rtol=1e-6)
    assert "loss" not in again.metrics and int(again.state.step) == 4
    for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(first.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _flip_bytes(path: str, count: int = 64) -> None:
    """XORs ``count`` bytes in the middle of ``path`` (its size stays the same)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(max(size // 2 - count // 2, 0))
        data = f.read(count)
        f.seek(max(size // 2 - count // 2, 0))
        f.write(bytes(b ^ 0xFF for b in data))
    assert os.path.getsize(path) == size


def _largest_state_file(step_dir: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return max(files, key=os.path.getsize)


def _release_params(workdir: str):
    import mnemax

    _, variables = mnemax.load_pretrained(os.path.join(workdir, "release"))
    return jax.tree.leaves(variables)


def test_flipped_bytes_fall_back_and_resume_bitwise(tmp_path, data_dir):
    """64 bytes flipped inside the newest checkpoint's largest file (same size; orbax reads it
    without complaint) fail the manifest check: the run reports the file, falls back to the
    checkpoint before, resumes, and ends with the parameters of an uninterrupted run, bit for bit."""
    from mnemax.train.trainer import Trainer

    from .trainer_utils import tiny_config

    cfg = dict(**{"train.steps": 6, "checkpoint.every_steps": 2, "release.write": True})
    ref = str(tmp_path / "ref")
    Trainer(tiny_config(data_dir, **cfg), ref).fit()
    want = _release_params(ref)

    run = str(tmp_path / "run")  # the same finished run, whose newest checkpoint is then damaged
    shutil.copytree(ref, run)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4", "6"]
    victim = _largest_state_file(os.path.join(run, "checkpoints", "6"))
    _flip_bytes(victim)
    buf = io.StringIO()
    with redirect_stdout(buf):
        Trainer(tiny_config(data_dir, **cfg), run).fit()
    out = buf.getvalue()
    rel = os.path.relpath(victim, os.path.join(run, "checkpoints", "6"))
    assert f"checkpoint at step 6 is unreadable: {rel} does not match its sha256" in out, out
    assert "resumed from the checkpoint at step 4" in out, out
    got = _release_params(run)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_checkpoints_corrupt_is_a_short_clear_error(tmp_path, data_dir):
    """With every checkpoint's bytes flipped the CLI exits 1 with a message saying what to do,
    in under 50 lines, and moves nothing; restart_if_corrupt=True then trains from step 0."""
    from mnemax.train.trainer import Trainer

    from .trainer_utils import tiny_config

    changes = {"train.steps": 4, "checkpoint.every_steps": 2}
    flags = flag_overrides(**changes)
    run = str(tmp_path / "run")
    Trainer(tiny_config(data_dir, **changes), run).fit()  # the same run the flags describe, in-process
    ckpts = os.path.join(run, "checkpoints")
    for step in os.listdir(ckpts):
        _flip_bytes(_largest_state_file(os.path.join(ckpts, step)))
    proc = cli(run, data_dir, *flags)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, out
    assert len(out.splitlines()) < 50, out
    assert "no checkpoint in" in out and "restart_if_corrupt" in out, out
    assert sorted(os.listdir(ckpts)) == ["2", "4"], "nothing may be moved when no checkpoint is good"
    out = _finish(cli(run, data_dir, *flags, "--config.checkpoint.restart_if_corrupt=True"))
    assert "starting over" in out and "resumed from" not in out, out
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2, 3, 4]


def test_resume_under_a_changed_config_is_an_error(tmp_path, data_dir):
    """A changed learning rate, seed or task is an error listing the fields; allowed by name it
    resumes, and the release records the config trained and the change."""
    from mnemax.train.trainer import Trainer

    from .trainer_utils import tiny_config

    run = str(tmp_path / "run")
    Trainer(tiny_config(data_dir, **{"train.steps": 2}), run).fit()
    with pytest.raises(ValueError, match=r"train\.learning_rate: 0\.003 -> 0\.01"):
        Trainer(tiny_config(data_dir, **{"train.steps": 2, "train.learning_rate": 1e-2}), run).fit()
    with pytest.raises(ValueError, match=r"\(seed: 0 -> 1\)"):
        Trainer(tiny_config(data_dir, **{"train.steps": 2, "seed": 1}), run).fit()
    with pytest.raises(ValueError, match=r"task\.params\.num_pairs: 4 -> 2"):
        Trainer(tiny_config(data_dir, **{"train.steps": 2, "task.params.num_pairs": 2}), run).fit()
    with pytest.raises(ValueError, match=r"allow_changes=train\.steps"):
        Trainer(tiny_config(data_dir, **{"train.steps": 3}), run).fit()
    # allowed by name: it resumes, and the release says what was trained
    Trainer(tiny_config(data_dir, **{"train.steps": 3, "checkpoint.allow_changes": "train.steps",
                                     "release.write": True}), run).fit()
    with open(os.path.join(run, "release", "config.json")) as f:
        extra = json.load(f)["extra"]
    assert extra["config"]["train"]["steps"] == 3 and extra["trained_steps"] == 3
    assert extra["config_changes"] == [{"field": "train.steps", "checkpoint": 2, "now": 3, "step": 2}]
