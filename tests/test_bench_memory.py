"""The memory benchmark (``mnemax.train.bench``, the ``mnemax-bench`` console script).

The smoke run goes through the installed console script as a subprocess, once per module
(:func:`smoke`): two families (:data:`SMOKE_FAMILIES`) train on a cell, every task runs,
and the table, JSON and plots are written with one row per cell and finite numbers. The
same run over every registered family is ``-m slow`` (about 4 minutes on 2 cores; the
registry's families all having rows is checked in CI without training). Its rows are held to
independent numbers (a cell's checkpoint scored in numpy, a cell trained by the trainer
directly), and the tests of the flags that train (``--parallel``, ``--skip_done``,
``--learning_rate``, ``--seeds``) compare their rows with the smoke run's instead of
training the same cells again.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mnemax
from mnemax.configs.base import base_config
from mnemax.train import tasks as tasks_lib
from mnemax.train.bench import cli, plan, tables
from mnemax.train.trainer import Trainer

from .trainer_utils import held_out_split, numpy_metrics

SMOKE_CELL = ["--tasks", "mqar", "--difficulties", "pairs=4"]  # the cell every family trains in the smoke run
# the families of the CI smoke run: the baseline (every task) and one family with one cell, on
# either side of "n" (the merge test splits there)
SMOKE_FAMILIES = ["transformer", "mamba"]


def bench_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mnemax-bench")
    if not os.path.exists(exe):
        pytest.fail(f"the mnemax-bench console script is not installed next to this interpreter ({exe}); "
                    'run `pip install -e ".[bench]"` (pyproject.toml [project.scripts])')
    return exe


def run_smoke(tmp, families=None):
    """``mnemax-bench memory --smoke [--families ...]`` as a subprocess (the test session's
    environment: CPU, its compilation cache): its output folder, workdir, stdout and JSON."""
    out, work = tmp / "out", tmp / "work"
    cmd = [bench_exe(), "memory", "--smoke", "--out", str(out), "--workdir", str(work)]
    if families:
        cmd += ["--families", *families]
    proc = subprocess.run(cmd, cwd=str(tmp), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "memory_tiny_smoke.json").read_text())
    return {"tmp": tmp, "out": out, "work": work, "stdout": proc.stdout, "doc": doc, "rows": doc["rows"]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run of :data:`SMOKE_FAMILIES` (see :func:`run_smoke`)."""
    return run_smoke(tmp_path_factory.mktemp("smoke"), SMOKE_FAMILIES)


@pytest.mark.slow
def test_smoke_run_trains_every_family(tmp_path):
    """``mnemax-bench memory --smoke`` with no --families: every family of the registry
    trains its MQAR cell to finite numbers, the baseline every task."""
    run = run_smoke(tmp_path)
    rows = run["rows"]
    assert [r["family"] for r in rows if r["task"] == "mqar"] == list(plan.families())
    assert {mnemax.get_config(r["preset"]).family for r in rows} == set(mnemax.list_families())
    assert not [r for r in rows if "error" in r]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) and r["params"] > 0 and r["steps"] == 3


def smoke_row(smoke, family: str, task: str = "mqar") -> dict:
    (row,) = [r for r in smoke["rows"] if r["family"] == family and r["task"] == task]
    return row


def test_smoke_run_covers_its_families_and_every_task(smoke):
    rows, fams = smoke["rows"], plan.families(SMOKE_FAMILIES)
    assert [r["family"] for r in rows if r["task"] == "mqar"] == list(fams)
    assert {r["task"] for r in rows} == {c.task for c in plan.cells("tiny")}
    # every family of the zoo's registry would have a row (trained in the slow test above)
    assert {mnemax.get_config(preset).family for preset, _ in plan.families().values()} == set(mnemax.list_families())
    failed = [r for r in rows if "error" in r]
    assert not failed, failed
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) and r["params"] > 0 and r["steps"] == 3
    table = (smoke["out"] / "memory_tiny_smoke.md").read_text()
    for fam in fams:
        assert f"| {fam} |" in table
    assert table.splitlines()[0] == ("| family | params | mqar pairs=4 | passkey len=64 | recall dancers=4 | "
                                     "selective_copying tokens=4 | spiking_adding bins=30 |")
    mamba = smoke_row(smoke, "mamba")  # a family with one cell: its accuracy, then "-" (not run)
    assert f"| mamba | {mamba['params']:,}-{mamba['params']:,} | {mamba['accuracy']:.3f} | - | - | - | - |" in table
    assert table.strip() in smoke["stdout"]
    # the rows printed on stdout say what the JSON says
    printed = [json.loads(line) for line in smoke["stdout"].splitlines() if line.startswith("{")]
    assert [(p["family"], p["task"], p["accuracy"]) for p in printed] == [
        (r["family"], r["task"], round(r["accuracy"], 4)) for r in rows]
    assert (smoke["doc"]["budget"], smoke["doc"]["smoke"], smoke["doc"]["steps"]) == ("tiny", True, None)
    assert os.path.exists(smoke["out"] / "plots" / "mqar_accuracy_vs_pairs.png")
    assert os.path.exists(smoke["out"] / "plots" / "passkey_accuracy_vs_length.png")


def test_smoke_cell_equals_numpy_on_its_checkpoint(smoke):
    """The transformer MQAR row: its checkpoint's parameters on the cell's test split, scored
    in numpy; the model rebuilt from the run's config.json has the row's size."""
    row = smoke_row(smoke, "transformer")
    (cell,) = [d for d in os.listdir(smoke["work"]) if d.endswith("-transformer-mqar-pairs4")]
    cell = smoke["work"] / cell
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


def test_smoke_passkey_row_equals_the_trainer(smoke):
    """The passkey row (accuracy by depth and by length) holds the numbers of the same cell
    trained by the trainer directly: the smoke settings written out here, the model the
    budget's sizing picked; the longer lengths scored in numpy with the state ``fit`` returns."""
    row = smoke_row(smoke, plan.BASELINE, "passkey")
    (cell,) = [c for c in plan.cells("tiny") if c.task == "passkey"]
    preset, fixed = plan.families()[row["family"]]
    spec = tasks_lib.make_task("passkey", **cell.params).spec()
    overrides, n_params = plan.sized_overrides(preset, fixed, spec, plan.BUDGETS["tiny"]["params"],
                                               plan.BUDGETS["tiny"]["layers"], span=max(cell.eval_lengths))
    assert (row["params"], row["d_model"]) == (n_params, overrides["d_model"])
    data_dir = str(smoke["tmp"] / "trainer-data")
    c = base_config()
    c.model.preset = preset
    c.model.overrides = {k: v for k, v in overrides.items() if k not in spec.model_overrides()}
    c.task.name, c.task.params = "passkey", cell.params
    c.task.num_train, c.task.num_test, c.task.data_dir = 64, 32, data_dir
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 3, 8, 1
    c.train.learning_rate = plan.DEFAULT_LR
    c.eval.every_steps, c.eval.batch_size, c.checkpoint.every_steps, c.mesh.num_devices = 0, 32, 0, 1
    c.log.progress_bar = c.log.console = c.log.tensorboard = c.release.write = False
    trainer = Trainer(c, str(smoke["tmp"] / "trainer-run"))
    fitted = trainer.fit()
    result = fitted.metrics
    groups = {k.replace("eval_accuracy/", "acc "): v for k, v in result.items() if k.startswith("eval_accuracy/")}
    assert len(groups) >= 2
    # accuracies are ratios of counts: equal; the loss to float rounding (another process)
    assert {k: v for k, v in row.items() if k.startswith("acc ") and "len=" not in k} == groups
    assert row["accuracy"] == result["eval_accuracy"]
    np.testing.assert_allclose(row["loss"], result["eval_loss"], rtol=1e-6)
    assert [k for k in row if k.startswith("acc len=")] == [f"acc len={n}" for n in cell.eval_lengths] == [
        "acc len=64", "acc len=128", "acc len=256"]
    for length in cell.eval_lengths:
        task = {"name": "passkey", "params": {**cell.params, "seq_len": length}, "num_train": 1, "num_test": 32, "seed": 0}
        inputs, targets, mask = held_out_split(task, data_dir)
        logits = jax.jit(trainer.model.apply)({"params": fitted.state.params}, inputs)[0]
        np.testing.assert_allclose(row[f"acc len={length}"], numpy_metrics(logits, targets, mask)["eval_accuracy"],
                                   rtol=1e-6, atol=1e-7, err_msg=str(length))


def test_merged_halves_are_the_same_table(smoke, tmp_path):
    """A table split by family (as on separate GPUs) and merged back is the same table; the
    merged file names where and when its rows were measured; budgets and --steps don't mix."""
    rows, data = smoke["rows"], smoke["doc"]
    table = (smoke["out"] / "memory_tiny_smoke.md").read_text()
    halves = [[r for r in rows if (r["family"] < "n") == first] for first in (True, False)]
    assert all(halves)
    measured = [{}, {"device": "cuda:0 (NVIDIA H100 80GB HBM3)", "date": "2999-01-02"}]  # the second half elsewhere
    for n, part in enumerate(halves):
        with open(tmp_path / f"part{n}.json", "w") as f:
            json.dump({**data, "rows": part, **measured[n]}, f)
    merged = cli.memory(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"),
                         "--out", str(tmp_path / "merged")])
    doc = json.load(open(tmp_path / "merged" / "memory_tiny_smoke.json"))
    assert doc["device"] == f"{data['device']}, cuda:0 (NVIDIA H100 80GB HBM3)" and doc["date"] == "2999-01-02"
    by_key = lambda rs: sorted((r["family"], r["task"], r["difficulty"], r["accuracy"]) for r in rs)  # noqa: E731
    assert by_key(merged["rows"]) == by_key(rows)
    assert sorted(merged["table"].splitlines()) == sorted(table.strip().splitlines())
    with open(tmp_path / "other.json", "w") as f:
        json.dump({**data, "budget": "10m"}, f)
    with pytest.raises(ValueError, match="different budgets"):
        cli.memory(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "other.json"), "--out", str(tmp_path)])
    # a --steps run names its files by its steps, and does not merge with the budget's own steps
    with open(tmp_path / "long.json", "w") as f:
        json.dump({**data, "steps": 2000}, f)
    with pytest.raises(ValueError, match="different budgets or --steps"):
        cli.memory(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "long.json"), "--out", str(tmp_path)])
    long = cli.memory(["--merge", str(tmp_path / "long.json"), "--out", str(tmp_path / "long")])
    assert open(tmp_path / "long" / "memory_tiny_2000steps_smoke.md").read().strip() == long["table"].strip()
    assert os.path.exists(tmp_path / "long" / "plots" / "mqar_accuracy_vs_pairs_2000steps.png")
    # another budget's plots carry its name, so a 10m table does not overwrite the tiny one's
    cli.memory(["--merge", str(tmp_path / "other.json"), "--out", str(tmp_path / "ten")])
    assert sorted(os.listdir(tmp_path / "ten" / "plots")) == ["mqar_accuracy_vs_pairs_10m.png", "passkey_accuracy_vs_length_10m.png"]


def test_parallel_processes_give_the_serial_rows(smoke, tmp_path):
    # --parallel 2 runs each cell in its own process; the rows (in plan order) carry the same
    # numbers as the same cells trained one after another by the smoke run
    argv = ["--smoke", "--families", "transformer", "mamba", *SMOKE_CELL]
    par = cli.memory([*argv, "--parallel", "2", "--out", str(tmp_path / "par"), "--workdir", str(tmp_path / "wp")])["rows"]
    assert [r["family"] for r in par] == ["transformer", "mamba"]
    for b in par:
        a = smoke_row(smoke, b["family"])
        assert "error" not in b, b
        assert b["params"] == a["params"] and b["d_model"] == a["d_model"]
        assert math.isclose(b["loss"], a["loss"], rel_tol=1e-4) and abs(b["accuracy"] - a["accuracy"]) < 1e-6, (a, b)
    assert os.path.exists(tmp_path / "par" / "memory_tiny_smoke.json")
    assert len(os.listdir(tmp_path / "wp" / "logs")) == 2
    with pytest.raises(ValueError, match="--parallel: got 0"):
        cli.memory([*argv, "--parallel", "0", "--out", str(tmp_path)])


def test_skip_done_trains_only_the_missing_cells(smoke, tmp_path):
    # --skip_done: the cells an earlier table holds (here the smoke run's transformer cell) are
    # not trained again and its rows are carried into the new table verbatim; the missing
    # cell's row equals the same cell trained by the smoke run
    done = tmp_path / "done.json"
    first = smoke_row(smoke, "transformer")
    done.write_text(json.dumps({**smoke["doc"], "rows": [first]}))
    both = cli.memory(["--smoke", *SMOKE_CELL, "--families", "transformer", "mamba", "--skip_done", str(done),
                       "--out", str(tmp_path / "b"), "--workdir", str(tmp_path / "wb")])
    assert [r["family"] for r in both["rows"]] == ["transformer", "mamba"]
    assert both["rows"][0] == first
    a, b = smoke_row(smoke, "mamba"), both["rows"][1]
    assert "error" not in b and b["params"] == a["params"]
    assert math.isclose(b["loss"], a["loss"], rel_tol=1e-4) and abs(b["accuracy"] - a["accuracy"]) < 1e-6, (a, b)
    trained = [d for d in os.listdir(tmp_path / "wb") if d != "data"]
    assert trained and all("mamba" in d for d in trained), trained
    doc = json.load(open(tmp_path / "b" / "memory_tiny_smoke.json"))
    assert doc["merged_from"] == [os.path.abspath(done)] and len(doc["rows"]) == 2


def test_skip_done_retrains_a_passkey_row_missing_an_asked_length(smoke, tmp_path):
    # a kept row is carried as it is (here a made-up MQAR row, and one at another rate); a
    # passkey row evaluated at 1x only is trained again when 1x, 2x and 4x are asked for, and
    # the new row (the smoke run's passkey cell, trained again) replaces it
    lr = plan.DEFAULT_LR
    fake_mqar = {"family": "transformer", "preset": "transformer-tiny", "task": "mqar", "difficulty": "pairs=4",
                 "params": 1, "accuracy": 0.123, "loss": 9.0, "lr": lr, "seed": 0}
    old_pk = {"family": "transformer", "preset": "transformer-tiny", "task": "passkey", "difficulty": "len=64",
              "params": 1, "accuracy": 0.5, "loss": 9.0, "lr": lr, "seed": 0, "acc len=64": 0.5}
    other_rate = dict(fake_mqar, lr=lr / 3, accuracy=0.9)
    path = tmp_path / "done.json"
    path.write_text(json.dumps({"budget": "tiny", "steps": None, "smoke": True, "device": "cpu", "date": "2026-01-01",
                                "rows": [fake_mqar, old_pk, other_rate]}))
    out = cli.memory(["--smoke", "--families", "transformer", "--tasks", "mqar", "passkey", "--difficulties",
                      "pairs=4", "len=64", "--skip_done", str(path),
                      "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w"), "--data_dir", str(smoke["work"] / "data")])
    rows = out["rows"]
    assert rows[:2] == [fake_mqar, other_rate]
    assert len(rows) == 3 and rows[2]["task"] == "passkey" and "error" not in rows[2]
    again, ref = rows[2], smoke_row(smoke, "transformer", "passkey")
    assert {k for k in again if k.startswith("acc len=")} == {"acc len=64", "acc len=128", "acc len=256"}
    for k in ("params", "d_model", "accuracy", "acc len=64", "acc len=128", "acc len=256"):
        assert math.isclose(again[k], ref[k], rel_tol=1e-6), (k, again[k], ref[k])
    with pytest.raises(ValueError, match="--skip_done: .* has \\(budget, steps, smoke\\) \\('tiny', None, True\\); expected \\('tiny', 5, True\\)"):
        cli.memory(["--smoke", "--steps", "5", "--families", "transformer", "--tasks", "mqar", "--skip_done", str(path),
                    "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="--skip_done: .* does not exist"):
        cli.memory(["--smoke", "--families", "transformer", "--skip_done", str(tmp_path / "nope.json"),
                    "--out", str(tmp_path / "o3")])


@pytest.fixture(scope="module")
def rate_and_seeds(smoke):
    """The smoke run's transformer cell at ``--learning_rate 1e-2`` and ``--seeds 0 1``, in the
    smoke run's --workdir (which holds that cell at the default rate and seed 0)."""
    out = smoke["tmp"] / "rate_and_seeds"
    result = cli.memory(["--smoke", "--families", "transformer", *SMOKE_CELL, "--learning_rate", "1e-2", "--seeds", "0", "1",
                         "--workdir", str(smoke["work"]), "--out", str(out)])
    return {"rows": result["rows"], "out": out, "runs": sorted(d for d in os.listdir(smoke["work"]) if d.startswith("tiny-"))}


def test_learning_rate_flag_reaches_the_trainer_and_its_own_workdir(smoke, rate_and_seeds):
    """``--learning_rate`` sets every cell's peak rate: the same cell at two rates, in one
    --workdir, trains two models (no resume across rates) whose losses differ, each row
    recording its rate; a rate <= 0 is refused."""
    default = smoke_row(smoke, "transformer")
    at_rate = rate_and_seeds["rows"][0]
    assert (default["lr"], at_rate["lr"]) == (plan.DEFAULT_LR, 1e-2) and all(r["lr"] == 1e-2 for r in rate_and_seeds["rows"])
    assert at_rate["seed"] == default["seed"] == 0 and at_rate["loss"] != default["loss"]
    runs = [d for d in rate_and_seeds["runs"] if d.endswith("-transformer-mqar-pairs4")]
    # (named by the budget's steps, not the smoke run's 3)
    assert runs == ["tiny-400steps-lr0.01-smoke-transformer-mqar-pairs4", "tiny-400steps-smoke-transformer-mqar-pairs4"], runs
    with pytest.raises(ValueError, match="--learning_rate must be > 0, got 0.0"):
        cli.memory(["--smoke", "--families", "transformer", *SMOKE_CELL, "--learning_rate", "0", "--out", str(smoke["tmp"])])


def test_seeds_flag_trains_each_cell_once_per_seed(smoke, rate_and_seeds):
    """``--seeds 0 1``: the same cell trained twice in one --workdir (no resume across
    seeds), from different initialisations and data (different losses), each row recording
    its seed; repeated or negative seeds are refused."""
    rows = rate_and_seeds["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["loss"] != rows[1]["loss"]
    assert "tiny-400steps-lr0.01-smoke-transformer-mqar-pairs4-seed1" in rate_and_seeds["runs"]
    table = (rate_and_seeds["out"] / "memory_tiny_smoke.md").read_text()
    mean, lo, hi = np.mean([r["accuracy"] for r in rows]), min(r["accuracy"] for r in rows), max(r["accuracy"] for r in rows)
    assert f"| transformer | {rows[0]['params']:,}-{rows[0]['params']:,} | {mean:.3f} ({lo:.3f}-{hi:.3f}) |" in table, table
    for bad in (["0", "0"], ["-1"]):
        with pytest.raises(ValueError, match="--seeds: got"):
            cli.memory(["--smoke", "--families", "transformer", *SMOKE_CELL, "--out", str(smoke["tmp"]), "--seeds", *bad])


def test_missing_matplotlib_is_reported_before_training(tmp_path):
    """Without matplotlib (hidden here by a package that fails to import) ``mnemax-bench``
    stops at start-up with exit status 2 and one line naming the bench extra; nothing is
    trained or written."""
    hide = tmp_path / "hide" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'matplotlib\'", name="matplotlib")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [bench_exe(), "memory", "--smoke", *SMOKE_CELL, "--families", "transformer", "--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "mnemax-bench memory: the benchmark's plots need matplotlib, which is not importable (No module named "
        "'matplotlib'); install the bench extra: pip install \"mnemax[bench]\"  (from a checkout: pip install -e \".[bench]\")")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists() and not work.exists()


def test_unknown_command_prints_the_usage(capsys):
    for argv in ([], ["speed"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2 and capsys.readouterr().err.startswith("usage: mnemax-bench memory")


def test_families_are_the_registry_s(monkeypatch):
    """The rows follow the registry: a family registered later (here a stand-in ``toy``
    family with a ``toy-tiny`` preset) gets a row without an edit to the benchmark; a family
    with no tiny preset and no FAMILY_ROWS entry is reported, not benchmarked; the built-in
    families all have rows."""
    assert plan.unbenchmarked_families() == []
    rows = plan.all_families()
    assert list(rows)[:2] == ["transformer", "transformer+keyconv"]  # the baseline first
    for label, (preset, fixed) in rows.items():
        assert preset in mnemax.list_models(), label
        block = mnemax.get_config(preset).block
        assert all(hasattr(block, field) for field in fixed), (label, fixed)
    families, models, get_config = mnemax.list_families, mnemax.list_models, mnemax.get_config

    class Toy:
        family = "toy"

    monkeypatch.setattr(mnemax, "list_families", lambda: [*families(), "toy", "bare"])
    monkeypatch.setattr(mnemax, "list_models", lambda: [*models(), "toy-tiny", "toy-big", "bare-big"])
    monkeypatch.setattr(mnemax, "get_config", lambda name, **kw: Toy() if name.startswith(("toy", "bare")) else get_config(name, **kw))
    with_toy = plan.all_families()
    assert with_toy == {**rows, "toy": ("toy-tiny", {})}
    assert plan.unbenchmarked_families() == ["bare"]
    assert plan.families(["toy", "mamba"]) == {"toy": ("toy-tiny", {}), "mamba": rows["mamba"]}
    with pytest.raises(ValueError, match=r"--families: unknown \['nope'\]"):
        plan.families(["nope"])


@pytest.mark.parametrize("budget", sorted(plan.BUDGETS))
def test_every_cell_of_every_budget_is_a_valid_task(budget):
    # every cell's task parameters pass the task's own checks (the 10m/125m MQAR at 64 pairs
    # asked for 64 keys from a 128-token vocabulary, which holds 63, and failed on the GPU)
    for cell in plan.cells(budget):
        spec = tasks_lib.make_task(cell.task, **cell.params).spec()
        assert spec.seq_len >= 1, cell


def test_smoke_plan_every_family_on_one_cell_and_the_baseline_on_every_task():
    todo = plan.select_cells("tiny")
    fams = plan.families()
    jobs = plan.jobs(fams, todo, [0, 1], smoke=True)
    first = [(j.family, j.cell.difficulty) for j in jobs if j.seed == 0]
    assert first[: len(fams)] == [(f, "pairs=4") for f in fams]
    assert first[len(fams):] == [(plan.BASELINE, d) for d in ("len=64", "tokens=4", "dancers=4", "bins=30")]
    assert [j.seed for j in jobs[:2]] == [0, 1]
    # with --tasks: every family on every selected cell
    some = plan.select_cells("tiny", ["mqar"], ["pairs=8", "pairs=16"])
    assert [(j.family, j.cell.difficulty) for j in plan.jobs(["a", "b"], some, [0], smoke=True, all_tasks=False)] == [
        ("a", "pairs=8"), ("a", "pairs=16"), ("b", "pairs=8"), ("b", "pairs=16")]
    with pytest.raises(ValueError, match=r"--difficulties: unknown \['pairs=3'\]"):
        plan.select_cells("tiny", ["mqar"], ["pairs=3"])


def test_passkey_length_option():
    # --passkey_len moves the passkey cell (its name, its task and its 1x/2x/4x evaluation)
    # and leaves the other cells as the budget has them
    default, longer = plan.cells("10m"), plan.cells("10m", passkey_len=1024)
    pk = next(c for c in longer if c.task == "passkey")
    assert pk.difficulty == "len=1024" and pk.eval_lengths == (1024, 2048, 4096)
    assert tasks_lib.make_task(pk.task, **pk.params).spec().seq_len == 1024
    assert [c for c in longer if c.task != "passkey"] == [c for c in default if c.task != "passkey"]
    with pytest.raises(ValueError, match="passkey_len: got 8"):
        plan.cells("10m", passkey_len=8)


def test_passkey_eval_multiples_size_the_memories_to_the_longest():
    # --passkey_eval 1 4 16: passkey is evaluated at 256, 1024 and 4096 tokens, and the
    # windowed families' memories are sized to 4096 (not the default 4x = 1024)
    pk = next(c for c in plan.cells("10m", passkey_eval=(16, 1, 4)) if c.task == "passkey")
    assert pk.eval_lengths == (256, 1024, 4096)
    spec = tasks_lib.make_task(pk.task, **pk.params).spec()
    for fam, key in (("transformer", "window"), ("hopfield", "memory_size")):
        preset, fixed = plan.families([fam])[fam]
        ov, _ = plan.sized_overrides(preset, fixed, spec, 60_000, 2, span=max(pk.eval_lengths))
        assert ov[key] == 4096, (fam, ov)
        default, _ = plan.sized_overrides(preset, fixed, spec, 60_000, 2)
        assert default[key] == 1024, (fam, default)
    for bad in ((), (0, 1), (1, 1), (1.5,)):
        with pytest.raises(ValueError, match="passkey_eval: got"):
            plan.cells("10m", passkey_eval=bad)


@pytest.mark.parametrize("family", ["transformer", "hopfield"])
def test_sized_memories_reach_the_first_token_at_the_longest_evaluated_context(family):
    """Passkey is evaluated at 4x its training length: with the benchmark's overrides the last
    step's logits still depend on the first token (hopfield-tiny's 32-step ring buffer did not)."""
    cell = next(c for c in plan.cells("tiny") if c.task == "passkey")
    spec = tasks_lib.make_task(cell.task, **cell.params).spec()
    preset, fixed = plan.families([family])[family]
    overrides, _ = plan.sized_overrides(preset, fixed, spec, 60_000, 2)
    model = mnemax.build(mnemax.get_config(preset, **overrides))
    length = max(cell.eval_lengths)
    tokens = np.random.default_rng(0).integers(2, spec.vocab_size, (1, length))
    params = model.init(jax.random.PRNGKey(0), tokens)
    other = tokens.copy()
    other[0, 0] = 2 + (tokens[0, 0] - 1) % (spec.vocab_size - 2)  # a different first token
    last = lambda t: np.asarray(model.apply(params, t)[0][0, -1])  # noqa: E731
    assert np.abs(last(tokens) - last(other)).max() > 1e-6


def test_hcam_chunks_cover_the_longest_evaluated_context():
    preset, fixed = plan.families(["hcam"])["hcam"]
    for budget in plan.BUDGETS:
        # the passkey cell (evaluated at 4x its length) and the longest-sequence other cell:
        # each distinct sizing traces up to 16 models, so not every cell of every budget
        cells = plan.cells(budget)
        longest_other = max((c for c in cells if not c.eval_lengths),
                            key=lambda c: tasks_lib.make_task(c.task, **c.params).spec().seq_len)
        for cell in [c for c in cells if c.eval_lengths] + [longest_other]:
            spec = tasks_lib.make_task(cell.task, **cell.params).spec()
            ov, _ = plan.sized_overrides(preset, fixed, spec, 60_000, 2)
            longest = max(cell.eval_lengths or (spec.seq_len,))
            assert ov["num_chunks"] * ov["chunk_size"] >= longest, (budget, cell)


def test_single_layer_elm_reaches_the_10m_budget():
    """The ELM preset has one layer, so only its width can reach a budget: with widths up to
    1024 the 10m spiking-adding cell got 4.2 M parameters; 1536 memory units give 9.5 M,
    within 10% of the target (the parameter count is the model's own, traced)."""
    preset, fixed = plan.families(["elm"])["elm"]
    cell = next(c for c in plan.cells("10m") if c.task == "spiking_adding")
    spec = tasks_lib.make_task(cell.task, **cell.params).spec()
    ov, n = plan.sized_overrides(preset, plan.family_overrides("elm", fixed, "10m"), spec,
                                 plan.BUDGETS["10m"]["params"], plan.BUDGETS["10m"]["layers"])
    assert abs(n / 10_000_000 - 1) < 0.1, (ov["d_model"], n)


def test_long_budget_overrides_name_benchmark_rows():
    """Every key of LONG_BUDGET_OVERRIDES is a row label of the benchmark (a family name such
    as "gated_deltanet" where the row is "gdn" would silently apply to nothing), and each
    override is a block field of that row's preset."""
    rows = plan.all_families()
    for label, ov in plan.LONG_BUDGET_OVERRIDES.items():
        assert label in rows, (label, sorted(rows))
        block = mnemax.get_config(rows[label][0]).block
        for field in ov:
            assert hasattr(block, field), (label, field)


def test_long_budget_mlstm_train_step_fits_a_gpu():
    """At the 10m budget the mLSTM family takes 4 heads and 64-step chunks: with the tiny
    preset's 2 heads and 16-step chunks its MQAR train step asked an H100 for 50 GiB. The
    compiler's own count of the gradient's temporaries (batch 4 here) must drop at least 3x."""
    import jax.numpy as jnp

    preset, fixed = plan.families(["mlstm"])["mlstm"]
    cell = next(c for c in plan.cells("10m") if c.task == "mqar")
    spec = tasks_lib.make_task(cell.task, **cell.params).spec()
    budget = plan.BUDGETS["10m"]

    def temporaries(fixed_overrides):
        ov, _ = plan.sized_overrides(preset, fixed_overrides, spec, budget["params"], budget["layers"])
        # one of the budget's layers (each holds the same states): a quarter of the compile time
        model = mnemax.build(mnemax.get_config(preset, **{**ov, "n_layers": 1}))
        x = jnp.zeros((4, spec.seq_len), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

        def loss(p, x):
            return jnp.mean(jnp.square(model.apply(p, x)[0].astype(jnp.float32)))

        return jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    assert plan.family_overrides("mlstm", fixed, "tiny") == fixed
    long = plan.family_overrides("mlstm", fixed, "10m")
    assert long["num_heads"] == 4 and long["chunk_size"] == 64
    assert temporaries(long) * 3 <= temporaries(fixed)
    with pytest.raises(ValueError, match="budget: got '1b'"):
        plan.family_overrides("mlstm", fixed, "1b")


def test_table_keeps_a_row_per_learning_rate():
    """Rows of one family at two learning rates (merged runs) get a table row each with
    their own accuracies, instead of the later rate overwriting the earlier; rows at one
    rate keep the plain family name."""
    def row(fam, lr, diff, acc):
        return {"family": fam, "task": "mqar", "difficulty": diff, "params": 10, "accuracy": acc, "lr": lr}

    rows = [row("mlstm", 3e-3, "pairs=16", 0.0), row("mlstm", 3e-3, "pairs=64", 0.025),
            row("mlstm", 1e-3, "pairs=16", 0.9998), row("mamba", 3e-3, "pairs=16", 0.008)]
    lines = tables.markdown(rows).splitlines()
    assert lines[2] == "| mlstm (lr 0.003) | 10-10 | 0.000 | 0.025 |"
    assert lines[3] == "| mlstm (lr 0.001) | 10-10 | 1.000 | - |"
    assert lines[4] == "| mamba (lr 0.003) | 10-10 | 0.008 | - |"
    assert tables.markdown(rows[:2]).splitlines()[2] == "| mlstm | 10-10 | 0.000 | 0.025 |"
    old = {k: v for k, v in row("mamba", None, "pairs=64", 0.01).items() if k != "lr"}  # a row from before "lr" was kept
    assert tables.markdown(rows[:2] + [old]).splitlines()[3] == "| mamba | 10-10 | - | 0.010 |"


def test_table_averages_a_cell_over_its_seeds():
    """Rows of one cell at several seeds become one table cell: their mean accuracy and,
    in brackets, the lowest and highest (the passkey length table too); one seed keeps
    the plain number."""
    def row(seed, diff, acc, **extra):
        return {"family": "mamba", "task": "mqar", "difficulty": diff, "params": 10, "accuracy": acc, "seed": seed, **extra}

    rows = [row(0, "pairs=16", 0.2), row(1, "pairs=16", 0.5), row(2, "pairs=16", 0.8), row(0, "pairs=64", 0.01)]
    lines = tables.markdown(rows).splitlines()
    assert lines[2] == "| mamba | 10-10 | 0.500 (0.200-0.800) | 0.010 |"
    assert lines[4] == "Each cell: the mean accuracy over its 1 to 3 seeds and, in brackets, the lowest and highest."
    pk = [{**row(s, "len=64", a, **{"acc len=64": a, "acc len=256": a / 2}), "task": "passkey"} for s, a in ((0, 1.0), (1, 0.5))]
    text = tables.markdown(pk)
    assert "| mamba | 0.750 (0.500-1.000) | 0.375 (0.250-0.500) |" in text, text
    assert "over its 2 seeds" in text


def test_a_run_whose_every_cell_failed_writes_its_error_rows(tmp_path):
    """A cell that raised (on the H100, a kernel asking for more shared memory than the GPU
    has) still gets its JSON with the error row, and the table says which cells failed and
    why instead of the writer crashing on an empty table (which had hidden the error behind
    the --parallel parent's 'process exited with 1')."""
    from mnemax.train.bench import results, runner

    err = runner.error_row("gdn", "gdn-tiny", plan.Cell("mqar", "pairs=16", {}), 0,
                           "JaxRuntimeError: RESOURCE_EXHAUSTED: Shared memory size limit exceeded")
    out = results.write([err], "10m", False, str(tmp_path), steps=2000, device="cpu", date="2026-12-07")
    with open(tmp_path / "memory_10m_2000steps.json") as f:
        assert json.load(f)["rows"][0]["error"].startswith("JaxRuntimeError: RESOURCE_EXHAUSTED")
    assert out["table"].startswith("| family | params |")  # an empty table: no cell finished
    assert "- gdn mqar pairs=16 (seed 0): JaxRuntimeError: RESOURCE_EXHAUSTED" in out["table"]
    assert "Cells that failed" in (tmp_path / "memory_10m_2000steps.md").read_text()
