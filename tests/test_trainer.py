"""The sharded trainer: mesh equivalence, real sharding, config errors before compiling,
non-finite steps skipped and counted."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.train.trainer import Trainer

from .trainer_utils import losses, np_reference, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def test_eight_devices_match_one(tmp_path, data_dir):
    assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
    sharded = tiny_config(data_dir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.num_devices": 8})
    single = tiny_config(data_dir, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.num_devices": 1})
    t8 = Trainer(sharded, str(tmp_path / "eight"))
    state = t8.init_state()
    p = state.params
    # embedding (vocab 32, embed 32) -> (tensor, fsdp); query (embed, heads, head_dim) -> (fsdp, tensor, -)
    emb = p["embed"]["embedding"]
    assert emb.shape == (32, 32) and emb.addressable_shards[0].data.shape == (16, 16)
    q = p["block_0"]["attn"]["query"]["kernel"]
    assert q.shape == (32, 2, 16) and q.addressable_shards[0].data.shape == (16, 1, 16)
    up = p["block_1"]["mlp"]["up"]["kernel"]
    assert up.addressable_shards[0].data.shape == (16, up.shape[1] // 2)
    mu = state.opt_state[1][0].mu["embed"]["embedding"]  # adamw's first moment follows the params
    assert mu.addressable_shards[0].data.shape == (16, 16)
    assert len({d for d in emb.sharding.device_set}) == 8
    del state
    r8 = t8.fit().metrics
    t1 = Trainer(single, str(tmp_path / "one"))
    fit1 = t1.fit()
    r1 = fit1.metrics
    l8, l1 = losses(str(tmp_path / "eight")), losses(str(tmp_path / "one"))
    assert sorted(l8) == sorted(l1) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([l8[s] for s in range(1, 6)], [l1[s] for s in range(1, 6)], rtol=1e-5, atol=1e-6)
    assert l1[5] < l1[1], "the loss should fall over 5 steps"
    np.testing.assert_allclose(r8["eval_loss"], r1["eval_loss"], rtol=1e-5)
    # step 1's loss is the masked mean nll of batch 0 under the initial parameters (numpy)
    batch = t1.feeder.train_batch_local(0)
    examples = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["inputs"]))]
    sums = np_reference(t1, t1.init_state().params, examples)
    assert 0 < sums["count"] < batch["mask"].size
    np.testing.assert_allclose(l1[1], sums["nll"] / sums["count"], rtol=1e-5)

    # fit() returns the final state: the one its last checkpoint holds, bit for bit, and whose
    # parameters give the final held-out numbers it reports (numpy, one test example at a time)
    assert int(fit1.state.step) == 5 and set(r1) >= {"loss", "accuracy", "eval_loss", "eval_accuracy"}
    saved = _restore_state(os.path.join(str(tmp_path / "one"), "checkpoints"), t1, 5)
    for got, want in zip(jax.tree.leaves(fit1.state), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    test = t1.feeder.test
    held_out = np_reference(t1, fit1.state.params, [test[i] for i in range(len(test))])
    np.testing.assert_allclose(r1["eval_loss"], held_out["nll"] / held_out["count"], rtol=1e-5)
    np.testing.assert_allclose(r1["eval_accuracy"], held_out["correct"] / held_out["count"], rtol=1e-6)
    assert abs(r1["eval_loss"] - sums["nll"] / sums["count"]) > 1e-3  # trained: not the initial parameters


class _Compiles:
    def __init__(self):
        self.events = []

    def __call__(self, event, *args, **kwargs):
        if "compile" in event:
            self.events.append(event)


BAD = [
    ({"model.preset": "no-such-model"}, r"model\.preset"),
    ({"mesh.data": -1, "mesh.fsdp": 3}, r"mesh\.fsdp"),
    ({"mesh.data": 3, "mesh.fsdp": 1, "mesh.num_devices": -1}, r"mesh\.data"),
    ({"mesh.data": 4, "mesh.fsdp": 2, "train.batch_size": 12}, r"train\.batch_size"),
    ({"model.overrides.window": 16}, r"task\.seq_len"),
    ({"task.params.seq_len": 10}, r"task\.seq_len"),
    ({"task.name": "nonsense"}, r"task\.name"),
    ({"train.steps": 0}, r"train\.steps"),
]


@pytest.mark.parametrize("changes,field", BAD)
def test_bad_configs_fail_before_compiling(tmp_path, data_dir, changes, field):
    listener = _Compiles()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(ValueError, match=field):
            Trainer(tiny_config(data_dir, **changes), str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not listener.events, f"compiled before failing: {listener.events}"


def _train_step_flops_per_device(trainer) -> float:
    from mnemax.sharding import batch_sharding

    b, t = trainer.config.train.batch_size, trainer.spec.seq_len
    shapes = {"inputs": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32), "mask": ((b, t), jnp.float32),
              "group": ((b,), jnp.int32)}
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(trainer.mesh, len(s))) for k, (s, d) in shapes.items()}
    counter = jax.ShapeDtypeStruct((), jnp.int32)
    cost = trainer.train_step.lower(trainer.abstract_state, batch, counter).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("mesh", [{"mesh.fsdp": 4}, {"mesh.data": 2, "mesh.fsdp": 2}, {"mesh.fsdp": 2, "mesh.tensor": 2}])
def test_every_mesh_splits_the_compute(tmp_path, data_dir, mesh):
    # The compiled step's FLOPs per device on a 4-device mesh against one device. With the blocks
    # under nn.scan, meshes with an fsdp axis used to redo most of the batch on every device (the
    # activations followed the parameters' embed sharding): 0.70 of the one-device FLOPs for
    # fsdp=4 and 0.41 for the others, before mnemax.sharding.constrain_rows.
    def config(**mesh_fields):
        c = tiny_config(data_dir, **{"train.batch_size": 16, **mesh_fields})
        c.model.preset, c.model.overrides = "mamba-tiny", {"d_model": 64, "n_layers": 2, "scan_layers": True}
        return c

    one = Trainer(config(**{"mesh.num_devices": 1}), str(tmp_path / "one"))
    four = Trainer(config(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, **mesh, "mesh.num_devices": 4}), str(tmp_path / "four"))
    ratio = _train_step_flops_per_device(four) / _train_step_flops_per_device(one)
    assert 0.2 < ratio < 0.3, ratio


def _restore_state(directory, trainer, step):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory) as mgr:
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(trainer.abstract_state)))
    return out["state"]


def _restore_params(directory, trainer, step):
    return _restore_state(directory, trainer, step).params


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, data_dir):
    """learning_rate 1e30: step 2's update makes the next losses NaN. Those steps are skipped (the
    parameters stay bit for bit those after step 2, as a 2-step run's checkpoint holds them), counted
    in ``nonfinite_steps``, and past ``train.max_nonfinite_steps`` the run stops with an error before
    any further checkpoint, and writes no release."""
    from mnemax.train.metrics import read_metrics
    from mnemax.train.trainer import TrainingDivergedError

    cfg = {"train.learning_rate": 1e30, "train.schedule": "constant", "train.grad_clip": 0.0,
           "train.max_nonfinite_steps": 2, "checkpoint.every_steps": 2, "release.write": True}
    ref = Trainer(tiny_config(data_dir, **{**cfg, "train.steps": 2}), str(tmp_path / "ref"))
    ref.fit()
    work = str(tmp_path / "run")
    trainer = Trainer(tiny_config(data_dir, **{**cfg, "train.steps": 8}), work)
    with pytest.raises(TrainingDivergedError, match=r"train\.max_nonfinite_steps: 3 of the steps 1\.\.5"):
        trainer.fit()
    records = [r for r in read_metrics(work) if "loss" in r]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 2, 3]
    assert np.isfinite(records[1]["loss"]) and not np.isfinite(records[2]["loss"])
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2", "4"]
    assert not os.path.exists(os.path.join(work, "release"))
    want = jax.tree.leaves(_restore_params(os.path.join(str(tmp_path / "ref"), "checkpoints"), ref, 2))
    got = jax.tree.leaves(_restore_params(os.path.join(work, "checkpoints"), trainer, 4))
    assert all(np.isfinite(np.asarray(g)).all() for g in got)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
