"""The memory benchmark in smoke mode: every family trains on a cell, every task runs,
and the table, JSON and plots are written with one row per cell and finite numbers."""

import json
import math
import os

from mnemax.train import bench_memory


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
    table = open(tmp_path / "memory_tiny_smoke.md").read()
    for fam in fams:
        assert f"| {fam} |" in table
    data = json.load(open(tmp_path / "memory_tiny_smoke.json"))
    assert len(data["rows"]) == len(rows)
    assert os.path.exists(tmp_path / "plots" / "mqar_accuracy_vs_pairs.png")
    assert os.path.exists(tmp_path / "plots" / "passkey_accuracy_vs_length.png")
