"""Two real processes (gloo on localhost) train like one process over the same devices,
and their checkpoint restores in one process on a different mesh."""

import socket

import numpy as np
import pytest

from mnemax.train.checkpoint import Checkpointer
from mnemax.train.trainer import Trainer

from .trainer_utils import cli, eval_records, flag_overrides, losses, tiny_config

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_restore_elsewhere(tmp_path):
    data_dir = str(tmp_path / "data")
    flags = flag_overrides(**{"mesh.data": 2, "mesh.fsdp": 2, "checkpoint.every_steps": 5, "eval.batch_size": 8})
    port = _free_port()
    multi = str(tmp_path / "two")
    procs = [
        cli(multi, data_dir, *flags, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}", devices=2)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    single = str(tmp_path / "one")
    p = cli(single, data_dir, *flags, devices=4)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    lm, l1 = losses(multi), losses(single)
    assert sorted(lm) == sorted(l1) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([lm[s] for s in range(1, 6)], [l1[s] for s in range(1, 6)], rtol=1e-5, atol=1e-6)
    eval_multi = eval_records(multi)[-1]["eval_loss"]

    # Restore the two-process checkpoint in this process on another mesh: 8 devices as
    # (data 1, fsdp 4, tensor 2) -- it evaluates to the same held-out loss.
    cfg = tiny_config(data_dir, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "mesh.num_devices": 8})
    trainer = Trainer(cfg, str(tmp_path / "restore"))
    ck = Checkpointer(f"{multi}/checkpoints", use_async=False)
    step, state, saved_cfg = ck.restore_latest(trainer.abstract_state)
    ck.close()
    assert step == 5 and saved_cfg["mesh"]["data"] == 2
    emb = state.params["embed"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (16, 8)  # vocab 32 / tensor 2, embed 32 / fsdp 4
    np.testing.assert_allclose(trainer.evaluate(state.params)["eval_loss"], eval_multi, rtol=1e-5)
