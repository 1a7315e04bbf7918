"""The memory benchmark in smoke mode: every family trains on a cell, every task runs,
and the table, JSON and plots are written with one row per cell and finite numbers."""

import json
import math
import os

import pytest

from mnemax.configs.base import base_config
from mnemax.train import bench_memory
from mnemax.train.tasks import make_task
from mnemax.train.trainer import Trainer


def check_a_cell_against_the_trainer(rows, tmp_path):
    """The passkey row (accuracy by depth) holds the numbers of the same cell trained by the
    trainer directly: the smoke settings written out here, the model the budget's sizing picked."""
    (row,) = [r for r in rows if r["task"] == "passkey"]
    (cell,) = [c for c in bench_memory.cells("tiny") if c.task == "passkey"]
    preset, fixed = bench_memory.available_families()[row["family"]]
    spec = make_task("passkey", **cell.params).spec()
    overrides, n_params = bench_memory.sized_overrides(preset, fixed, spec, bench_memory.BUDGETS["tiny"]["params"],
                                                       bench_memory.BUDGETS["tiny"]["layers"], span=max(cell.eval_lengths))
    assert (row["params"], row["d_model"]) == (n_params, overrides["d_model"])
    c = base_config()
    c.model.preset = preset
    c.model.overrides = {k: v for k, v in overrides.items() if k not in spec.model_overrides()}
    c.task.name, c.task.params = "passkey", cell.params
    c.task.num_train, c.task.num_test, c.task.data_dir = 64, 32, str(tmp_path / "trainer-data")
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 3, 8, 1
    c.train.learning_rate = bench_memory.DEFAULT_LR
    c.eval.every_steps, c.eval.batch_size, c.checkpoint.every_steps, c.mesh.num_devices = 0, 32, 0, 1
    c.log.progress_bar = c.log.console = c.log.tensorboard = c.release.write = False
    result = Trainer(c, str(tmp_path / "trainer-run")).run()
    groups = {k.replace("eval_accuracy/", "acc "): v for k, v in result.items() if k.startswith("eval_accuracy/")}
    assert len(groups) >= 2
    assert {k: v for k, v in row.items() if k.startswith("acc ") and "len=" not in k} == groups
    assert (row["accuracy"], row["loss"]) == (result["eval_accuracy"], result["eval_loss"])


def test_memory_benchmark_smoke(tmp_path):
    out = bench_memory.main(["--smoke", "--out", str(tmp_path), "--workdir", str(tmp_path / "work")])
    rows = out["rows"]
    fams = bench_memory.available_families()
    assert {r["family"] for r in rows} == set(fams)
    assert {r["task"] for r in rows} == {c.task for c in bench_memory.cells("tiny")}
    failed = [r for r in rows if "error" in r]
    assert not failed, failed
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) and r["params"] > 0
    check_a_cell_against_the_trainer(rows, tmp_path)
    table = open(tmp_path / "memory_tiny_smoke.md").read()
    for fam in fams:
        assert f"| {fam} |" in table
    data = json.load(open(tmp_path / "memory_tiny_smoke.json"))
    assert len(data["rows"]) == len(rows)
    assert os.path.exists(tmp_path / "plots" / "mqar_accuracy_vs_pairs.png")
    assert os.path.exists(tmp_path / "plots" / "passkey_accuracy_vs_length.png")

    # A table split by family (as on separate GPUs) and merged back is the same table.
    halves = [[r for r in rows if (r["family"] < "m") == first] for first in (True, False)]
    assert all(halves)
    measured = [{}, {"device": "cuda:0 (NVIDIA H100 80GB HBM3)", "date": "2999-01-02"}]  # the second half elsewhere
    for n, part in enumerate(halves):
        with open(tmp_path / f"part{n}.json", "w") as f:
            json.dump({**data, "rows": part, **measured[n]}, f)
    merged = bench_memory.main(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"),
                                "--out", str(tmp_path / "merged")])
    # the merged file names where and when its rows were measured, not the merging machine
    doc = json.load(open(tmp_path / "merged" / "memory_tiny_smoke.json"))
    assert doc["device"] == f"{data['device']}, cuda:0 (NVIDIA H100 80GB HBM3)" and doc["date"] == "2999-01-02"
    by_key = lambda rs: sorted((r["family"], r["task"], r["difficulty"], r["accuracy"]) for r in rs)  # noqa: E731
    assert by_key(merged["rows"]) == by_key(rows)
    assert sorted(merged["table"].splitlines()) == sorted(table.strip().splitlines())
    with open(tmp_path / "other.json", "w") as f:
        json.dump({**data, "budget": "10m"}, f)
    with pytest.raises(ValueError, match="different budgets"):
        bench_memory.main(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "other.json"), "--out", str(tmp_path)])
    # a --steps run names its files by its steps, and does not merge with the budget's own steps
    with open(tmp_path / "long.json", "w") as f:
        json.dump({**data, "steps": 2000}, f)
    with pytest.raises(ValueError, match="different budgets or --steps"):
        bench_memory.main(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "long.json"), "--out", str(tmp_path)])
    long = bench_memory.main(["--merge", str(tmp_path / "long.json"), "--out", str(tmp_path / "long")])
    assert open(tmp_path / "long" / "memory_tiny_2000steps_smoke.md").read().strip() == long["table"].strip()
    assert os.path.exists(tmp_path / "long" / "plots" / "mqar_accuracy_vs_pairs_2000steps.png")
    # another budget's plots carry its name, so a 10m table does not overwrite the tiny one's
    bench_memory.main(["--merge", str(tmp_path / "other.json"), "--out", str(tmp_path / "ten")])
    assert sorted(os.listdir(tmp_path / "ten" / "plots")) == ["mqar_accuracy_vs_pairs_10m.png", "passkey_accuracy_vs_length_10m.png"]


@pytest.mark.parametrize("budget", sorted(bench_memory.BUDGETS))
def test_every_cell_of_every_budget_is_a_valid_task(budget):
    # every cell's task parameters pass the task's own checks (the 10m/125m MQAR at 64 pairs
    # asked for 64 keys from a 128-token vocabulary, which holds 63, and failed on the GPU)
    from mnemax.train import tasks as tasks_lib

    for cell in bench_memory.cells(budget):
        spec = tasks_lib.make_task(cell.task, **cell.params).spec()
        assert spec.seq_len >= 1, cell


def test_passkey_length_option():
    # --passkey_len moves the passkey cell (its name, its task and its 1x/2x/4x evaluation)
    # and leaves the other cells as the budget has them
    from mnemax.train import tasks as tasks_lib

    default, longer = bench_memory.cells("10m"), bench_memory.cells("10m", passkey_len=1024)
    pk = next(c for c in longer if c.task == "passkey")
    assert pk.difficulty == "len=1024" and pk.eval_lengths == (1024, 2048, 4096)
    assert tasks_lib.make_task(pk.task, **pk.params).spec().seq_len == 1024
    assert [c for c in longer if c.task != "passkey"] == [c for c in default if c.task != "passkey"]
    with pytest.raises(ValueError, match="passkey_len: got 8"):
        bench_memory.cells("10m", passkey_len=8)


def test_passkey_eval_multiples_size_the_memories_to_the_longest():
    # --passkey_eval 1 4 16: passkey is evaluated at 256, 1024 and 4096 tokens, and the
    # windowed families' memories are sized to 4096 (not the default 4x = 1024)
    from mnemax.train import tasks as tasks_lib

    pk = next(c for c in bench_memory.cells("10m", passkey_eval=(16, 1, 4)) if c.task == "passkey")
    assert pk.eval_lengths == (256, 1024, 4096)
    spec = tasks_lib.make_task(pk.task, **pk.params).spec()
    for fam, key in (("transformer", "window"), ("hopfield", "memory_size")):
        preset, fixed = bench_memory.available_families([fam])[fam]
        ov, _ = bench_memory.sized_overrides(preset, fixed, spec, 60_000, 2, span=max(pk.eval_lengths))
        assert ov[key] == 4096, (fam, ov)
        default, _ = bench_memory.sized_overrides(preset, fixed, spec, 60_000, 2)
        assert default[key] == 1024, (fam, default)
    for bad in ((), (0, 1), (1, 1), (1.5,)):
        with pytest.raises(ValueError, match="passkey_eval: got"):
            bench_memory.cells("10m", passkey_eval=bad)


@pytest.mark.parametrize("family", ["transformer", "hopfield"])
def test_sized_memories_reach_the_first_token_at_the_longest_evaluated_context(family):
    """Passkey is evaluated at 4x its training length: with the benchmark's overrides the last
    step's logits still depend on the first token (hopfield-tiny's 32-step ring buffer did not)."""
    import jax
    import numpy as np

    import mnemax
    from mnemax.train import tasks as tasks_lib

    cell = next(c for c in bench_memory.cells("tiny") if c.task == "passkey")
    spec = tasks_lib.make_task(cell.task, **cell.params).spec()
    preset, fixed = bench_memory.available_families([family])[family]
    overrides, _ = bench_memory.sized_overrides(preset, fixed, spec, 60_000, 2)
    model = mnemax.build(mnemax.get_config(preset, **overrides))
    length = max(cell.eval_lengths)
    tokens = np.random.default_rng(0).integers(2, spec.vocab_size, (1, length))
    params = model.init(jax.random.PRNGKey(0), tokens)
    other = tokens.copy()
    other[0, 0] = 2 + (tokens[0, 0] - 1) % (spec.vocab_size - 2)  # a different first token
    last = lambda t: np.asarray(model.apply(params, t)[0][0, -1])  # noqa: E731
    assert np.abs(last(tokens) - last(other)).max() > 1e-6


def test_hcam_chunks_cover_the_longest_evaluated_context():
    from mnemax.train import tasks as tasks_lib

    preset, fixed = bench_memory.available_families(["hcam"])["hcam"]
    for budget in bench_memory.BUDGETS:
        # the passkey cell (evaluated at 4x its length) and the longest-sequence other cell:
        # each distinct sizing traces up to 16 models, so not every cell of every budget
        cells = bench_memory.cells(budget)
        longest_other = max((c for c in cells if not c.eval_lengths),
                            key=lambda c: tasks_lib.make_task(c.task, **c.params).spec().seq_len)
        for cell in [c for c in cells if c.eval_lengths] + [longest_other]:
            spec = tasks_lib.make_task(cell.task, **cell.params).spec()
            ov, _ = bench_memory.sized_overrides(preset, fixed, spec, 60_000, 2)
            longest = max(cell.eval_lengths or (spec.seq_len,))
            assert ov["num_chunks"] * ov["chunk_size"] >= longest, (budget, cell)


def test_single_layer_elm_reaches_the_10m_budget():
    """The ELM preset has one layer, so only its width can reach a budget: with widths up to
    1024 the 10m spiking-adding cell got 4.2 M parameters; 1536 memory units give 9.5 M,
    within 10% of the target (the parameter count is the model's own, traced)."""
    from mnemax.train import tasks as tasks_lib

    preset, fixed = bench_memory.available_families(["elm"])["elm"]
    cell = next(c for c in bench_memory.cells("10m") if c.task == "spiking_adding")
    spec = tasks_lib.make_task(cell.task, **cell.params).spec()
    ov, n = bench_memory.sized_overrides(preset, bench_memory.family_overrides("elm", fixed, "10m"), spec,
                                         bench_memory.BUDGETS["10m"]["params"], bench_memory.BUDGETS["10m"]["layers"])
    assert abs(n / 10_000_000 - 1) < 0.1, (ov["d_model"], n)


def test_long_budget_mlstm_train_step_fits_a_gpu():
    """At the 10m budget the mLSTM family takes 4 heads and 64-step chunks: with the tiny
    preset's 2 heads and 16-step chunks its MQAR train step asked an H100 for 50 GiB. The
    compiler's own count of the gradient's temporaries (batch 4 here) must drop at least 3x."""
    import jax
    import jax.numpy as jnp

    import mnemax
    from mnemax.train import tasks as tasks_lib

    preset, fixed = bench_memory.available_families(["mlstm"])["mlstm"]
    cell = next(c for c in bench_memory.cells("10m") if c.task == "mqar")
    spec = tasks_lib.make_task(cell.task, **cell.params).spec()
    budget = bench_memory.BUDGETS["10m"]

    def temporaries(fixed_overrides):
        ov, _ = bench_memory.sized_overrides(preset, fixed_overrides, spec, budget["params"], budget["layers"])
        # one of the budget's layers (each holds the same states): a quarter of the compile time
        model = mnemax.build(mnemax.get_config(preset, **{**ov, "n_layers": 1}))
        x = jnp.zeros((4, spec.seq_len), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

        def loss(p, x):
            return jnp.mean(jnp.square(model.apply(p, x)[0].astype(jnp.float32)))

        return jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    assert bench_memory.family_overrides("mlstm", fixed, "tiny") == fixed
    long = bench_memory.family_overrides("mlstm", fixed, "10m")
    assert long["num_heads"] == 4 and long["chunk_size"] == 64
    assert temporaries(long) * 3 <= temporaries(fixed)
    with pytest.raises(ValueError, match="budget: got '1b'"):
        bench_memory.family_overrides("mlstm", fixed, "1b")


def test_learning_rate_flag_reaches_the_trainer_and_its_own_workdir(tmp_path):
    """``--learning_rate`` sets every cell's peak rate: the same cell at two rates, in one
    --workdir, trains two models (no resume across rates) whose losses differ, each row
    recording its rate; a rate <= 0 is refused."""
    common = ["--smoke", "--families", "transformer", "--tasks", "mqar", "--difficulties", "pairs=4",
              "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)]
    rows = [bench_memory.main(common + ["--learning_rate", lr])["rows"][0] for lr in ("1e-2", "1e-5")]
    assert [r["lr"] for r in rows] == [1e-2, 1e-5]
    assert rows[0]["loss"] != rows[1]["loss"]
    runs = sorted(d for d in os.listdir(tmp_path / "work") if d.startswith("tiny-"))
    assert len(runs) == 2 and all("-lr" in d for d in runs), runs
    with pytest.raises(ValueError, match="--learning_rate must be > 0, got 0.0"):
        bench_memory.main(common + ["--learning_rate", "0"])


def test_table_keeps_a_row_per_learning_rate():
    """Rows of one family at two learning rates (merged runs) get a table row each with
    their own accuracies, instead of the later rate overwriting the earlier; rows at one
    rate keep the plain family name."""
    def row(fam, lr, diff, acc):
        return {"family": fam, "task": "mqar", "difficulty": diff, "params": 10, "accuracy": acc, "lr": lr}

    rows = [row("mlstm", 3e-3, "pairs=16", 0.0), row("mlstm", 3e-3, "pairs=64", 0.025),
            row("mlstm", 1e-3, "pairs=16", 0.9998), row("mamba", 3e-3, "pairs=16", 0.008)]
    lines = bench_memory.markdown(rows).splitlines()
    assert lines[2] == "| mlstm (lr 0.003) | 10-10 | 0.000 | 0.025 |"
    assert lines[3] == "| mlstm (lr 0.001) | 10-10 | 1.000 | - |"
    assert lines[4] == "| mamba (lr 0.003) | 10-10 | 0.008 | - |"
    assert bench_memory.markdown(rows[:2]).splitlines()[2] == "| mlstm | 10-10 | 0.000 | 0.025 |"
    old = {k: v for k, v in row("mamba", None, "pairs=64", 0.01).items() if k != "lr"}  # a row from before "lr" was kept
    assert bench_memory.markdown(rows[:2] + [old]).splitlines()[3] == "| mamba | 10-10 | - | 0.010 |"


def test_table_averages_a_cell_over_its_seeds():
    """Rows of one cell at several seeds become one table cell: their mean accuracy and,
    in brackets, the lowest and highest (the passkey length table too); one seed keeps
    the plain number."""
    def row(seed, diff, acc, **extra):
        return {"family": "mamba", "task": "mqar", "difficulty": diff, "params": 10, "accuracy": acc, "seed": seed, **extra}

    rows = [row(0, "pairs=16", 0.2), row(1, "pairs=16", 0.5), row(2, "pairs=16", 0.8), row(0, "pairs=64", 0.01)]
    lines = bench_memory.markdown(rows).splitlines()
    assert lines[2] == "| mamba | 10-10 | 0.500 (0.200-0.800) | 0.010 |"
    assert lines[4] == "Each cell: the mean accuracy over its 1 to 3 seeds and, in brackets, the lowest and highest."
    pk = [{**row(s, "len=64", a, **{"acc len=64": a, "acc len=256": a / 2}), "task": "passkey"} for s, a in ((0, 1.0), (1, 0.5))]
    text = bench_memory.markdown(pk)
    assert "| mamba | 0.750 (0.500-1.000) | 0.375 (0.250-0.500) |" in text, text
    assert "over its 2 seeds" in text


def test_seeds_flag_trains_each_cell_once_per_seed(tmp_path):
    """``--seeds 0 1``: the same cell trained twice in one --workdir (no resume across
    seeds), from different initialisations and data (different losses), each row recording
    its seed; repeated or negative seeds are refused."""
    common = ["--smoke", "--families", "transformer", "--tasks", "mqar", "--difficulties", "pairs=4",
              "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)]
    rows = bench_memory.main(common + ["--seeds", "0", "1"])["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["loss"] != rows[1]["loss"]
    runs = sorted(d for d in os.listdir(tmp_path / "work") if d.startswith("tiny-"))
    assert len(runs) == 2 and runs[1].endswith("-seed1"), runs
    assert "(" in open(tmp_path / "memory_tiny_smoke.md").read()  # mean (lowest-highest)
    for bad in (["0", "0"], ["-1"]):
        with pytest.raises(ValueError, match="--seeds: got"):
            bench_memory.main(common + ["--seeds", *bad])


def test_parallel_processes_give_the_serial_rows(tmp_path):
    # --parallel 2 runs each cell in its own process; the rows (in plan order) carry the same
    # numbers as the same cells trained one after another in this process
    argv = ["--smoke", "--families", "transformer", "mamba", "--tasks", "mqar", "--difficulties", "pairs=4"]
    serial = bench_memory.main([*argv, "--out", str(tmp_path / "serial"), "--workdir", str(tmp_path / "ws")])["rows"]
    par = bench_memory.main([*argv, "--parallel", "2", "--out", str(tmp_path / "par"), "--workdir", str(tmp_path / "wp")])["rows"]
    assert [r["family"] for r in par] == ["transformer", "mamba"]
    for a, b in zip(serial, par):
        assert "error" not in b, b
        assert b["params"] == a["params"] and b["d_model"] == a["d_model"]
        assert math.isclose(b["loss"], a["loss"], rel_tol=1e-4) and abs(b["accuracy"] - a["accuracy"]) < 1e-6, (a, b)
    assert os.path.exists(tmp_path / "par" / "memory_tiny_smoke.json")
    assert len(os.listdir(tmp_path / "wp" / "logs")) == 2
    with pytest.raises(ValueError, match="--parallel: got 0"):
        bench_memory.main([*argv, "--parallel", "0", "--out", str(tmp_path)])


def test_skip_done_trains_only_the_missing_cells(tmp_path):
    # --skip_done: the cells an earlier table holds are not trained again and its rows are
    # carried into the new table verbatim; the missing cell's row equals the same cell trained alone
    argv = ["--smoke", "--tasks", "mqar", "--difficulties", "pairs=4"]
    first = bench_memory.main([*argv, "--families", "transformer", "--out", str(tmp_path / "a"), "--workdir", str(tmp_path / "wa")])
    done = str(tmp_path / "a" / "memory_tiny_smoke.json")
    both = bench_memory.main([*argv, "--families", "transformer", "mamba", "--skip_done", done,
                              "--out", str(tmp_path / "b"), "--workdir", str(tmp_path / "wb")])
    alone = bench_memory.main([*argv, "--families", "mamba", "--out", str(tmp_path / "c"), "--workdir", str(tmp_path / "wc")])
    assert [r["family"] for r in both["rows"]] == ["transformer", "mamba"]
    assert both["rows"][0] == first["rows"][0]
    a, b = alone["rows"][0], both["rows"][1]
    assert "error" not in b and b["params"] == a["params"]
    assert math.isclose(b["loss"], a["loss"], rel_tol=1e-4) and abs(b["accuracy"] - a["accuracy"]) < 1e-6, (a, b)
    trained = [d for d in os.listdir(tmp_path / "wb") if d != "data"]
    assert trained and all("mamba" in d for d in trained), trained
    doc = json.load(open(tmp_path / "b" / "memory_tiny_smoke.json"))
    assert doc["merged_from"] == [os.path.abspath(done)] and len(doc["rows"]) == 2


def test_skip_done_retrains_a_passkey_row_missing_an_asked_length(tmp_path):
    # a kept row is carried as it is (here a made-up MQAR row); a passkey row evaluated at 1x only
    # is trained again when 1x and 2x are asked for, and the new row replaces it
    lr = bench_memory.DEFAULT_LR
    fake_mqar = {"family": "transformer", "preset": "transformer-tiny", "task": "mqar", "difficulty": "pairs=4",
                 "params": 1, "accuracy": 0.123, "loss": 9.0, "lr": lr, "seed": 0}
    old_pk = {"family": "transformer", "preset": "transformer-tiny", "task": "passkey", "difficulty": "len=64",
              "params": 1, "accuracy": 0.5, "loss": 9.0, "lr": lr, "seed": 0, "acc len=64": 0.5}
    other_rate = dict(fake_mqar, lr=lr / 3, accuracy=0.9)
    path = tmp_path / "done.json"
    path.write_text(json.dumps({"budget": "tiny", "steps": None, "smoke": True, "device": "cpu", "date": "2026-01-01",
                                "rows": [fake_mqar, old_pk, other_rate]}))
    out = bench_memory.main(["--smoke", "--families", "transformer", "--tasks", "mqar", "passkey", "--difficulties",
                             "pairs=4", "len=64", "--passkey_eval", "1", "2", "--skip_done", str(path),
                             "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w")])
    rows = out["rows"]
    assert rows[:2] == [fake_mqar, other_rate]
    assert len(rows) == 3 and rows[2]["task"] == "passkey" and "error" not in rows[2]
    assert {"acc len=64", "acc len=128"} <= set(rows[2]) and rows[2]["params"] > 1
    with pytest.raises(ValueError, match="--skip_done: .* has \\(budget, steps, smoke\\) \\('tiny', None, True\\); expected \\('tiny', 5, True\\)"):
        bench_memory.main(["--smoke", "--steps", "5", "--families", "transformer", "--tasks", "mqar", "--skip_done", str(path),
                           "--out", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="--skip_done: .* does not exist"):
        bench_memory.main(["--smoke", "--families", "transformer", "--skip_done", str(tmp_path / "nope.json"),
                           "--out", str(tmp_path / "o3")])
