"""Which parameters AdamW decays: weight matrices and embeddings, not the state-space
dynamics or biases (the reference Mamba marks ``A_log`` and ``D`` ``_no_weight_decay``;
the S4 code gives A, B and dt weight decay 0; biases and norm scales are never decayed).
Checked on the parameter names and, through the trainer's optimizer, on the closed form of
one AdamW step with zero gradients: decayed leaves shrink by exactly (1 - lr * wd)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import mnemax
from mnemax.layers import NO_WEIGHT_DECAY, weight_decay_mask
from mnemax.release import example_inputs
from mnemax.train.trainer import make_optimizer


def _flat(tree):
    """{"a/b/c": leaf} over dict keys only (nn.Partitioned boxes add an attribute key)."""
    return {
        "/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): v
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _params(preset, **overrides):
    cfg = mnemax.get_config(preset, **overrides)
    return mnemax.build(cfg).init(jax.random.PRNGKey(0), example_inputs(cfg))["params"]


@pytest.mark.parametrize(
    "preset, kept, decayed",
    [
        ("mamba-tiny", ["mixer/A_log", "mixer/D", "mixer/dt_bias", "norm/scale"], ["mixer/in_proj/kernel", "mixer/x_proj/kernel", "mixer/conv1d/kernel"]),
        ("s4d-tiny", ["log_A_real", "log_dt"], ["/C"]),
        ("slstm-tiny", ["slstm/bias"], ["recurrent_kernel"]),
    ],
)
def test_mask_by_name_and_rank(preset, kept, decayed):
    params = _params(preset)
    mask = _flat(weight_decay_mask(params))
    shapes = {k: np.shape(v) for k, v in _flat(params).items()}
    for frag in kept:
        hits = [k for k in mask if frag in k]
        assert hits, f"{preset}: no parameter matches {frag!r}; names: {sorted(mask)}"
        assert not any(mask[k] for k in hits), [(k, shapes[k]) for k in hits if mask[k]]
    for frag in decayed:
        hits = [k for k in mask if frag in k]
        assert hits and all(mask[k] for k in hits), (frag, [(k, mask[k]) for k in hits])
    # everything else follows the rank rule
    for k, m in mask.items():
        leaf = k.split("/")[-1]
        assert m == (len(shapes[k]) >= 2 and leaf not in NO_WEIGHT_DECAY), k


# Every leaf of one-layer models, written out by hand from the references' rules (Mamba:
# A_log and D are ``_no_weight_decay``; S4: A and dt get weight decay 0; nothing decays
# biases, norm scales or dt_bias; weight matrices, convolution kernels and embeddings decay).
EXPECTED_MASKS = {
    "mamba-tiny": {
        "block_0/mixer/A_log": False, "block_0/mixer/D": False, "block_0/mixer/conv1d/bias": False,
        "block_0/mixer/conv1d/kernel": True, "block_0/mixer/dt_bias": False, "block_0/mixer/dt_proj/kernel": True,
        "block_0/mixer/in_proj/kernel": True, "block_0/mixer/out_proj/kernel": True,
        "block_0/mixer/x_proj/kernel": True, "block_0/norm/scale": False, "embed/embedding": True,
        "final_norm/scale": False,
    },
    "s4d-tiny": {
        "block_0/mixer/A_imag": False, "block_0/mixer/C": True, "block_0/mixer/D": False,
        "block_0/mixer/log_A_real": False, "block_0/mixer/log_dt": False, "block_0/mixer/output_linear/bias": False,
        "block_0/mixer/output_linear/kernel": True, "block_0/norm/bias": False, "block_0/norm/scale": False,
        "embed/embedding": True, "final_norm/scale": False, "head/kernel": True,
    },
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_MASKS))
def test_mask_leaf_by_leaf(preset):
    mask = {k: bool(v) for k, v in _flat(weight_decay_mask(_params(preset, n_layers=1))).items()}
    assert mask == EXPECTED_MASKS[preset]


@pytest.mark.parametrize("decay_dynamics", [False, True])
def test_adamw_step_with_zero_gradients_is_the_closed_form(decay_dynamics):
    """``train.decay_dynamics=True`` is the rank rule alone (A_log decayed too)."""
    params = _params("mamba-tiny")
    t = ml_collections.ConfigDict(dict(
        schedule="constant", learning_rate=0.1, warmup_steps=1, steps=10, weight_decay=0.5,
        grad_clip=1.0, b1=0.9, b2=0.98, decay_dynamics=decay_dynamics,
    ))
    tx = make_optimizer(ml_collections.ConfigDict({"train": t}))
    state = tx.init(params)
    state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)[1]  # step 0: lr 0 (warm-up)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    mask, old, got = _flat(weight_decay_mask(params, frozenset() if decay_dynamics else NO_WEIGHT_DECAY)), _flat(params), _flat(new)
    assert any(mask[k] for k in mask if k.endswith("A_log")) == decay_dynamics
    n_decayed = 0
    for k in old:
        want = np.asarray(old[k]) * ((1 - 0.1 * 0.5) if mask[k] else 1.0)
        np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-6, atol=1e-7, err_msg=k)
        n_decayed += mask[k]
    assert 0 < n_decayed < len(old)
