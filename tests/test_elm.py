"""The ELM neuron: v1 and v2 against a plain Python loop of the paper's equations, the
reference NeuronIO parameter counts, routing, the contract, and the neuron model."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnemax
from mnemax.layers.elm import ELMBlock, ELMNeuron, interlocking_indices, overlapping_window_indices

from .contract import check_layer_contract


def python_loop(p, x, resets, *, version, n_branch, route, tau_m, tau_s=5.0, lam=5.0, dt=1.0, hidden_layers=1):
    """The ELM equations, step by step, in float64 (no linear_scan, no lax.scan)."""
    batch, time, _ = x.shape
    w_s = np.maximum(p["w_s"], 0.0)
    if route is not None:
        idx, valid = route
        x = x[..., idx] * valid
    n_syn = x.shape[-1]
    per = n_syn // n_branch
    kappa_s = math.exp(-dt / tau_s)
    kappa_m = np.exp(-dt / tau_m)
    kappa_lam = np.exp(-dt * lam / tau_m)
    d_m = tau_m.shape[0]
    ys = np.zeros((batch, time, p["w_y"]["kernel"].shape[1]))
    for b in range(batch):
        s = np.zeros(n_syn if version == 1 else n_branch)
        m = np.zeros(d_m)
        for t in range(time):
            if resets[b, t]:
                s, m = np.zeros_like(s), np.zeros_like(m)
            if version == 1:
                s = kappa_s * s + w_s * x[b, t]
                branch = np.array([s[i * per : (i + 1) * per].sum() for i in range(n_branch)])
            else:
                inp = w_s * x[b, t]
                s = kappa_s * s + np.array([inp[i * per : (i + 1) * per].sum() for i in range(n_branch)])
                branch = s
            z = np.concatenate([branch, kappa_m * m])
            for i in range(hidden_layers):
                z = np.maximum(z @ p[f"mlp_{i}_kernel"] + p[f"mlp_{i}_bias"], 0.0)
            z = z @ p[f"mlp_{hidden_layers}_kernel"] + p[f"mlp_{hidden_layers}_bias"]
            dm = 1.7159 * np.tanh(2.0 * z / 3.0)
            if version == 1:
                m = kappa_m * m + lam * (1 - kappa_m) * dm
            else:
                m = kappa_m * m + (1 - kappa_lam) * dm
            ys[b, t] = m @ p["w_y"]["kernel"] + p["w_y"]["bias"]
    return ys, s, m


@pytest.mark.parametrize(
    "version,routing,hidden_layers,learn_tau",
    [(1, "structured", 2, False), (2, "random", 1, True)],
)
def test_elm_matches_python_loop_of_the_equations(version, routing, hidden_layers, learn_tau):
    rng = np.random.default_rng(version)
    batch, time, n_in, n_branch, per, d_m = 2, 12, 7, 3, 4, 5
    layer = ELMNeuron(
        num_input=n_in, num_output=3, num_memory=d_m, version=version, num_branch=n_branch,
        num_synapse_per_branch=per, routing=routing, routing_seed=3, mlp_num_layers=hidden_layers,
        memory_tau_min=1.0, memory_tau_max=150.0, learn_memory_tau=learn_tau,
    )
    x = (rng.random((batch, time, n_in)) < 0.4).astype(np.float32)  # spikes
    resets = np.zeros((batch, time), bool)
    resets[1, 7] = True
    v = jax.jit(layer.init)(jax.random.key(0), jnp.asarray(x))
    # perturb w_s (some negative: the ReLU keeps them out) and, if learned, tau_m
    p = nn.meta.unbox(v["params"])
    p["w_s"] = p["w_s"] + jnp.asarray(rng.normal(0, 0.4, p["w_s"].shape), jnp.float32)
    tau_m = np.logspace(np.log10(1.0 + 1e-6), np.log10(150.0 - 1e-6), d_m)  # the reference's init
    if learn_tau:
        p["tau_m_proto"] = p["tau_m_proto"] + 0.3
        proto = np.asarray(p["tau_m_proto"], np.float64)
        tau_m = 1.0 + 149.0 / (1 + np.exp(-proto))
    v = {"params": p}
    y, state = jax.jit(layer.apply)(v, jnp.asarray(x), None, jnp.asarray(resets))
    if routing == "structured":
        win, valid = overlapping_window_indices(n_in, n_branch, per)
        route = (interlocking_indices(n_in)[win], valid.astype(np.float64))
    else:
        route = (np.random.default_rng(3).integers(0, n_in, n_branch * per), np.ones(n_branch * per))
    pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    want, s, m = python_loop(pn, x.astype(np.float64), resets, version=version, n_branch=n_branch, route=route,
                             tau_m=tau_m, hidden_layers=hidden_layers)
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(state.traces[-1]), s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.memory[-1]), m, rtol=2e-4, atol=2e-5)
    assert np.abs(want).max() > 0.1  # the dynamics did something


def test_structured_routing_indices():
    """n = 10 inputs, 3 branches of 4: stride ceil(10/3) = 4, windows [0..3], [4..7],
    [8..11] with 10, 11 masked; inputs interlocked as 0, 5, 1, 6, 2, 7, 3, 8, 4, 9."""
    assert list(interlocking_indices(10)) == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]
    idx, valid = overlapping_window_indices(10, 3, 4)
    assert list(idx) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9]
    assert list(valid) == [True] * 10 + [False] * 2
    with pytest.raises(ValueError, match="num_synapse_per_branch"):
        ELMNeuron(num_input=10, num_output=1, num_branch=3, num_synapse_per_branch=3, routing="structured").initial_state(1)
    with pytest.raises(ValueError, match="num_input"):
        ELMNeuron(num_input=10, num_output=1, num_branch=3, num_synapse_per_branch=3).initial_state(1)


@pytest.mark.parametrize("d_m,reference_count", [(1, 4601), (10, 5852), (20, 8002), (100, 54002)])
def test_neuronio_parameter_count(d_m, reference_count):
    """The reference's NeuronIO Branch-ELM (1278 inputs, 45 branches x 100 synapses,
    2 outputs, tau_m in [1, 150] not learned) has the README's parameter count, which is
    REFERENCES.md's formula with n_syn = 45 * 100."""
    layer = ELMNeuron(
        num_input=1278, num_output=2, num_memory=d_m, num_branch=45, num_synapse_per_branch=100,
        routing="structured", memory_tau_max=150.0,
    )
    shapes = jax.eval_shape(layer.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 2, 1278), jnp.float32))
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    n_syn, d_tree = 45 * 100, 45
    formula = n_syn + (d_tree + d_m) * 2 * d_m + 2 * d_m + 2 * d_m**2 + d_m + 2 * d_m + 2
    assert count == formula == reference_count
    learned = ELMNeuron(num_input=1278, num_output=2, num_memory=d_m, num_branch=45, num_synapse_per_branch=100,
                        routing="structured", memory_tau_max=150.0, learn_memory_tau=True)
    shapes = jax.eval_shape(learned.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 2, 1278), jnp.float32))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == formula + d_m


def test_elm_contract():
    check_layer_contract(
        lambda **kw: ELMNeuron(num_input=5, num_output=4, num_memory=6, version=2, num_branch=3,
                               num_synapse_per_branch=3, routing="random", memory_tau_max=20.0, **kw),
        lambda rng, b, t: jnp.asarray(rng.random((b, t, 5)), jnp.float32),
        time=9,
    )


def test_neuron_model_and_block():
    """elm-tiny (one neuron, mean-pooled logits): streaming == one call, a reset == a
    fresh start, outputs == the neuron's W_y readout averaged over time; the residual
    block is x + ELM(norm(x))."""
    model = mnemax.create("elm-tiny", pool="mean")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 9, 6)), jnp.float32)
    v = jax.jit(model.init)(jax.random.key(0), x)
    run = jax.jit(model.apply)
    y, s = run(v, x)
    y1, s1 = run(v, x[:, :4])
    y2, s2 = run(v, x[:, 4:], s1)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(y), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    first = jnp.zeros((2, 5), bool).at[:, 0].set(True)
    np.testing.assert_allclose(np.asarray(run(v, x[:, 4:], s1, first)[0]), np.asarray(run(v, x[:, 4:])[0]), rtol=1e-5, atol=1e-6)
    cfg = model.config
    neuron = ELMNeuron(num_input=6, num_output=4, num_memory=8, num_branch=3, num_synapse_per_branch=3, routing="random")
    per_step, _ = jax.jit(neuron.apply)({"params": v["params"]["neuron"]}, x)
    mean = np.cumsum(np.asarray(per_step, np.float64), axis=1) / np.arange(1, 10)[None, :, None]
    np.testing.assert_allclose(np.asarray(y), mean, rtol=1e-5, atol=1e-6)
    assert cfg.block["neuron_model"]

    block = ELMBlock(elm=ELMNeuron(num_input=4, num_output=4, num_memory=3))
    xb = jnp.asarray(rng.standard_normal((1, 5, 4)), jnp.float32)
    bv = jax.jit(block.init)(jax.random.key(1), xb)

    @jax.jit
    def by_hand(p, x):
        from mnemax.layers import RMSNorm

        h, _ = RMSNorm().apply({"params": p["norm"]}, x)
        return x + ELMNeuron(num_input=4, num_output=4, num_memory=3).apply({"params": p["elm"]}, h)[0]

    got = jax.jit(block.apply)(bv, xb)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(by_hand(bv["params"], xb)), rtol=1e-5, atol=1e-6)


def neuron_shapes(n_syn, n_branch, d_m, n_out, prefix="neuron"):
    """An ELM neuron's parameters (module docstring): w_s per synapse; the MLP
    [branch sums, kappa_m m] (n_branch + d_m) -> 2 d_m (ReLU) -> d_m, with biases; the
    readout W_y (d_m -> outputs) with bias; tau_m a constant (not learned)."""
    return {
        f"{prefix}/w_s": (n_syn,),
        f"{prefix}/mlp_0_kernel": (n_branch + d_m, 2 * d_m), f"{prefix}/mlp_0_bias": (2 * d_m,),
        f"{prefix}/mlp_1_kernel": (2 * d_m, d_m), f"{prefix}/mlp_1_bias": (d_m,),
        f"{prefix}/w_y/kernel": (d_m, n_out), f"{prefix}/w_y/bias": (n_out,),
    }


def neuron_count(n_syn, n_branch, d_m, n_out):
    return n_syn + (n_branch + d_m) * 2 * d_m + 2 * d_m + 2 * d_m * d_m + d_m + d_m * n_out + n_out


# The ELM presets of zoo/families/elm.py (single-neuron models: the inputs go straight to the
# synapses, W_y is the head): synapses, branches, memory units, classes.
ELM_PRESETS = {
    "elm-tiny": dict(n_in=6, n_syn=3 * 3, n_branch=3, d_m=8, n_out=4, count=373),
    "elm-small": dict(n_in=700, n_syn=700, n_branch=700, d_m=100, n_out=20, count=183_020),
    "branch-elm-small": dict(n_in=700, n_syn=64 * 16, n_branch=64, d_m=100, n_out=20, count=56_144),
}


def flat_shapes(tree):
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(a.shape) for path, a in leaves}


@pytest.mark.parametrize("name", sorted(ELM_PRESETS))
def test_elm_preset_parameter_count_and_shapes(name):
    """A single-neuron preset has exactly the neuron's parameters (no input projection,
    norm or separate head): the documented shapes, and the count n_syn + (d_tree + d_m)
    2 d_m + 2 d_m + 2 d_m^2 + d_m + d_m O + O (the NeuronIO formula with O outputs)."""
    spec = dict(ELM_PRESETS[name])
    n_in, pinned = spec.pop("n_in"), spec.pop("count")
    inputs = jax.ShapeDtypeStruct((1, 4, n_in), jnp.float32)
    shapes = jax.eval_shape(mnemax.create(name).init, jax.random.key(0), inputs)
    got = flat_shapes(shapes["params"])
    assert sum(int(np.prod(s)) for s in got.values()) == neuron_count(**spec) == pinned
    assert got == neuron_shapes(**spec)


def test_elm_stack_parameter_count_and_shapes():
    """elm-tiny as a stack (neuron_model=False, 2 layers): zoo/model.py's input projection
    (6 -> d, bias), per layer an RMSNorm scale and a d -> d neuron (its routing: 3 branches
    of 3 synapses, d_m = 8), no final norm ("none"), a classifier head with bias."""
    d, d_m, n_out, n_in = 8, 8, 4, 6
    shapes = jax.eval_shape(mnemax.create("elm-tiny", neuron_model=False, n_layers=2).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 4, n_in), jnp.float32))
    want = {"input_proj/kernel": (n_in, d), "input_proj/bias": (d,), "head/kernel": (d, n_out), "head/bias": (n_out,)}
    for i in range(2):
        want |= {f"block_{i}/norm/scale": (d,)} | neuron_shapes(9, 3, d_m, d, prefix=f"block_{i}/elm")
    got = flat_shapes(shapes["params"])
    per_layer = d + neuron_count(9, 3, d_m, d)
    assert sum(int(np.prod(s)) for s in got.values()) == n_in * d + d + 2 * per_layer + d * n_out + n_out == 926
    assert got == want


@pytest.mark.parametrize("version", [1, 2])
def test_bf16_keeps_the_slow_memory_units(version):
    """With the default tau_m (log-spaced over [1, 1000]), kappa_m = exp(-1/1000) is 1.0 in
    bf16 and the slowest units would never move; traces, decays and the m recurrence are
    float32, so bf16 compute stays within 5% of float32 at T = 4096, in the outputs and in
    the gradient norm of a loss (same float32 params), and the state is float32."""
    kw = dict(num_input=6, num_output=4, num_memory=8, num_branch=3, num_synapse_per_branch=3, routing="random",
              version=version)
    assert ELMNeuron(**kw).tau_m_init().max() > 999.0  # the defaults reach tau_m ~ 1000
    rng = np.random.default_rng(version)
    batch, time = 2, 4096
    # inputs exactly representable in bf16, so both runs see the same x
    x = jnp.asarray(rng.random((batch, time, 6)), jnp.bfloat16).astype(jnp.float32)
    w = jnp.asarray(rng.standard_normal((batch, time, 4)), jnp.float32)
    params = ELMNeuron(**kw).init(jax.random.key(0), x[:, :2])["params"]

    def run(dtype):
        layer = ELMNeuron(**kw, dtype=dtype, param_dtype=jnp.float32)

        def loss(p):
            y, state = layer.apply({"params": p}, x)
            return jnp.mean(y.astype(jnp.float32) * w), (y, state)

        (_, (y, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(g)) for k, g in jax.tree_util.tree_leaves_with_path(grads)}
        return y, state, math.sqrt(sum(n**2 for n in norms.values())), norms

    y32, state32, g32, norms32 = run(jnp.float32)
    y16, state16, g16, norms16 = run(jnp.bfloat16)
    assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves(state16):
        assert leaf.dtype == jnp.float32
    y32, y16 = np.asarray(y32, np.float64), np.asarray(y16, np.float64)
    rel = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
    assert rel < 0.05, f"bf16 output off float32 by {rel:.3f} (relative)"
    assert abs(g16 - g32) < 0.05 * g32, f"gradient norms: bf16 {g16:.4g}, float32 {g32:.4g}"
    for name in norms32:  # every parameter, those the scan closes over included
        assert abs(norms16[name] - norms32[name]) < 0.05 * norms32[name], (name, norms16[name], norms32[name])
    # the slowest unit's memory moved in bf16 as in float32 (it is frozen at 0 when 1 - kappa_m = 0)
    slow32, slow16 = np.asarray(state32.memory[:, -1]), np.asarray(state16.memory[:, -1])
    assert np.abs(slow32).min() > 1e-3
    np.testing.assert_allclose(slow16, slow32, rtol=0.05, atol=0.05 * np.abs(slow32).max())


def test_bf16_state_in_pieces():
    """Under bf16 compute, initial_state and the returned state are float32, and feeding the
    returned state back in (prefill then one-token steps) gives the one-call outputs."""
    layer = ELMNeuron(num_input=5, num_output=3, num_memory=6, version=1, num_branch=5, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 10, 5)), jnp.bfloat16)
    v = layer.init(jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(layer.initial_state(2)))
    run = jax.jit(layer.apply)
    y, state = run(v, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state))
    ys, s = [], None
    y1, s = run(v, x[:, :6], s)
    ys.append(y1)
    for t in range(6, 10):
        yt, s = run(v, x[:, t : t + 1], s)
        ys.append(yt)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, 1), np.float32), np.asarray(y, np.float32),
                               rtol=1e-2, atol=1e-2)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(state)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
