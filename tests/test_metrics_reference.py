"""The trainer's numbers against plain numpy written from their definitions: the masked
loss, accuracy and per-group accuracy (the figures of RESULTS.md's tables), the loss a
training step reports, and the learning-rate schedule (linear warm-up then cosine decay
to 1% of the peak, in closed form). Nothing here calls the trainer's own metric code to
compute an expected value: logits come from ``model.apply`` (anchored elsewhere) and the
examples straight from the task's test split."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mnemax.configs.passkey import get_config as passkey_config
from mnemax.train.trainer import Trainer, accumulate_eval, make_optimizer, masked_metrics

from .trainer_utils import np_metrics, np_reference


def test_masked_metrics_equal_per_step_loops():
    rng = np.random.default_rng(0)
    batch, time, vocab, groups = 6, 7, 5, 3
    logits = rng.standard_normal((batch, time, vocab)).astype(np.float32) * 2
    targets = rng.integers(0, vocab, (batch, time))
    targets[:, :3] = np.argmax(logits[:, :3], -1)  # some steps right, the rest mostly wrong
    mask = rng.random((batch, time)) < 0.5
    mask[0] = False  # an example with no scored step
    mask[1, :3] = True
    mask[1, 3:] = False  # one with only right answers
    group = np.array([0, 2, 2, 1, 0, 2])
    got = masked_metrics(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(group), groups)
    want = np_metrics(logits, targets, mask, group, groups)
    assert 0 < want["correct"] < want["count"] < batch * time
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_eval_summary_divides_by_the_scored_steps_of_each_group():
    totals = {"nll": 6.0, "correct": 3.0, "count": 12.0, "group_correct": np.array([1.0, 0.0, 2.0]),
              "group_count": np.array([4.0, 0.0, 8.0])}
    got = accumulate_eval(lambda b: jax.tree.map(jnp.asarray, totals), [None, None], ("a", "b", "c"))
    assert got == {"eval_loss": 0.5, "eval_accuracy": 0.25, "eval_accuracy/a": 0.25, "eval_accuracy/c": 0.25}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """Passkey (accuracy by needle depth) on a 2-layer Transformer of width 16, 16 test examples
    evaluated in batches of 6 (the last batch padded)."""
    c = passkey_config("transformer")
    c.task.data_dir = str(tmp_path_factory.mktemp("data"))
    c.task.params.seq_len, c.task.params.key_len, c.task.params.depth_buckets = 24, 3, 3
    c.task.num_train, c.task.num_test = 64, 16
    c.model.overrides.d_model, c.model.overrides.window = 16, 24
    c.train.batch_size, c.eval.batch_size = 8, 6
    c.mesh.num_devices = 1
    c.log.progress_bar = c.log.console = c.log.tensorboard = False
    c.release.write = False
    return Trainer(c, str(tmp_path_factory.mktemp("run")))


def test_trainer_evaluation_equals_numpy_on_the_test_split(trainer):
    params = trainer.init_state().params
    # sharpen the head so the untrained model's answers are not all one token
    params = jax.tree.map(lambda a: a * 3.0, params)
    got = trainer.evaluate(params)
    test = trainer.feeder.test
    sums = np_reference(trainer, params, [test[i] for i in range(len(test))])
    assert sums["count"] == 16 * 3  # key_len answer steps per example, each scored once
    want = {"eval_loss": sums["nll"] / sums["count"], "eval_accuracy": sums["correct"] / sums["count"]}
    for i, name in enumerate(trainer.spec.group_names):
        if sums["group_count"][i]:
            want[f"eval_accuracy/{name}"] = sums["group_correct"][i] / sums["group_count"][i]
    assert sorted(got) == sorted(want)
    assert len(want) >= 2 + 2, "at least two depth groups must be present"
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def closed_form_lr(step, peak, warmup, total, schedule):
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    end = 0.01 * peak
    frac = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedule_is_the_closed_form(schedule):
    """With one parameter, a constant gradient of 1, no clipping and no decay, AdamW's
    step-s update is -lr(s) / (1 + eps) (both moments' bias-corrected estimates are 1)."""
    peak, warmup, total = 0.02, 4, 12
    t = ml_collections.ConfigDict(dict(schedule=schedule, learning_rate=peak, warmup_steps=warmup, steps=total,
                                       weight_decay=0.0, grad_clip=0.0, b1=0.9, b2=0.98, decay_dynamics=False))
    tx = make_optimizer(ml_collections.ConfigDict({"train": t}))
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    got = []
    for _ in range(total + 3):
        updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
        got.append(-float(updates["w"][0, 0]))
    want = [closed_form_lr(s, peak, warmup, total, schedule) / (1 + 1e-8) for s in range(total + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert max(got) == pytest.approx(peak, rel=1e-5)


def test_gradient_clipping_is_by_the_global_norm():
    t = ml_collections.ConfigDict(dict(schedule="constant", learning_rate=1.0, warmup_steps=0, steps=5,
                                       weight_decay=0.0, grad_clip=1.0, b1=0.0, b2=0.0, decay_dynamics=False))
    tx = make_optimizer(ml_collections.ConfigDict({"train": t}))
    g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # global norm 5
    # b1 = b2 = 0: AdamW's direction is g / (|g| + eps) elementwise, blind to a uniform
    # scale; the clipped gradient is visible in the first moment instead
    state = tx.init(jax.tree.map(jnp.zeros_like, g))
    _, state = tx.update(g, state, jax.tree.map(jnp.zeros_like, g))
    clipped = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(np.asarray(clipped["a"]), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(clipped["b"]), [[0.8]], rtol=1e-6)
