"""Modern Hopfield layers: the energy, retrieval and metastable states of the paper, and the
set layers against closed forms written here (the causal mixer: tests/test_causal_hopfield.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.hopfield import (
    Hopfield,
    HopfieldLayer,
    HopfieldPooling,
    hopfield_energy,
    hopfield_update,
)

STATIC = dict(
    stored_pattern_as_static=True,
    state_pattern_as_static=True,
    pattern_projection_as_static=True,
    disable_out_projection=True,
    normalize_stored_pattern=False,
    normalize_stored_pattern_affine=False,
    normalize_state_pattern=False,
    normalize_state_pattern_affine=False,
    normalize_pattern_projection=False,
    normalize_pattern_projection_affine=False,
)


_JITTED = {}


def jrun(module, variables, *args, **kw):
    """module.apply under jit (bool keywords static): one compile instead of op-by-op,
    reused across calls with the same module and static keywords."""
    static = tuple(sorted((k, a) for k, a in kw.items() if isinstance(a, bool)))
    dynamic = {k: a for k, a in kw.items() if not isinstance(a, bool)}
    key = (repr(module), static)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(functools.partial(module.apply, **dict(static)))
    return _JITTED[key](variables, *args, **dynamic)


def jinit(module, seed, *args):
    return jax.jit(module.init)(jax.random.key(seed), *args)


def unbox(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(tree))


def np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def np_layer_norm(x, p, name, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * p[f"{name}_scale"] + p[f"{name}_bias"]


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- the functions


def test_energy_never_increases_under_the_update():
    """E(xi_{n+1}) <= E(xi_n) along 12 updates, for random patterns, queries and betas
    (the CCCP property, Theorem 1), in float64."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):

        @jax.jit
        def trajectory(xi, X, beta):
            def step(xi, _):
                new = hopfield_update(xi, X, beta)
                return new, hopfield_energy(new, X, beta)

            _, es = jax.lax.scan(step, xi, None, length=12)
            return jnp.concatenate([hopfield_energy(xi, X, beta)[None], es])

        for trial in range(8):
            X = rng.standard_normal((40, 12)) * rng.uniform(0.2, 3.0)
            xi = rng.standard_normal((16, 12)) * rng.uniform(0.1, 4.0)
            beta = float(rng.choice([0.05, 0.5, 1.0, 4.0, 32.0]))
            e = np.asarray(trajectory(jnp.asarray(xi), jnp.asarray(X), beta))
            steps = np.diff(e, axis=0)
            assert np.all(np.isfinite(e))
            assert np.all(steps <= 1e-12 * np.abs(e).max()), (trial, steps.max())
            assert steps.min() < -1e-6  # the trajectories do move
        # The energy formula itself, for one pattern set (paper eq. 2).
        X = rng.standard_normal((5, 3))
        x = rng.standard_normal(3)
        want = -np.log(np.exp(2.0 * X @ x).sum()) / 2.0 + x @ x / 2 + np.log(5) / 2.0 + (X**2).sum(1).max() / 2
        np.testing.assert_allclose(float(hopfield_energy(jnp.asarray(x), jnp.asarray(X), 2.0)), want, rtol=1e-12)


def test_one_step_retrieval_of_ten_thousand_patterns():
    """10^4 unit-norm random patterns in d = 64; each, perturbed by noise of norm 0.1, is
    retrieved in one update with error <= 1e-6 at beta = 64 (Theorem 4's bound
    2 (N - 1) exp(-beta Delta) M, with the measured separation Delta, is below 1e-6 for
    every pattern), while beta = 20 is not enough (errors ~1e-3)."""
    rng = np.random.default_rng(0)
    n, d, beta = 10_000, 64, 64.0
    X = unit_rows(rng, n, d)
    queries = X + 0.1 * unit_rows(rng, n, d)
    Xj, Qj = jnp.asarray(X, jnp.float32), jnp.asarray(queries, jnp.float32)

    @jax.jit
    def retrieve(b):
        chunks = Qj.reshape(10, n // 10, d)
        out = jax.lax.map(lambda q: hopfield_update(q, Xj, b), chunks).reshape(n, d)
        return jnp.linalg.norm(out - Xj, axis=-1)

    err = np.asarray(retrieve(beta))
    overlaps = queries @ X.T
    own = overlaps[np.arange(n), np.arange(n)]
    np.fill_diagonal(overlaps, -np.inf)
    separation = own - overlaps.max(axis=1)
    bound = 2 * (n - 1) * np.exp(-beta * separation) * 1.0  # M = max ||x_i|| = 1
    assert bound.max() <= 1e-6
    assert err.max() <= 1e-6, err.max()
    assert np.asarray(retrieve(20.0)).max() > 1e-4  # the separation, not luck, does it

    # The layer (static patterns, no normalisation, scaling = beta) on 1000 of them.
    layer = Hopfield(scaling=beta, **STATIC)
    y = jrun(layer, {}, Qj[None, :1000], Xj[None])
    np.testing.assert_allclose(np.asarray(y[0]), X[:1000], atol=1e-6)


def test_small_beta_gives_metastable_averages():
    """beta -> 0: one update gives the mean of all patterns. Intermediate beta with 3
    well separated clusters of 8 similar patterns: iterating converges to a metastable
    state near the mean of the query's cluster, not to one pattern."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 16))
    xi = rng.standard_normal((4, 16))
    out = np.asarray(hopfield_update(jnp.asarray(xi), jnp.asarray(X), 1e-4))
    np.testing.assert_allclose(out, np.broadcast_to(X.mean(0), out.shape), atol=5e-3)

    centres = 4.0 * unit_rows(rng, 3, 32)
    X = np.concatenate([c + 0.1 * rng.standard_normal((8, 32)) for c in centres])
    with jax.enable_x64(True):
        for c in range(3):
            xi = jnp.asarray(X[8 * c] + 0.3 * rng.standard_normal(32))
            for _ in range(30):
                xi = hopfield_update(xi, jnp.asarray(X), 1.0)
            xi = np.asarray(xi)
            weights = np_softmax(X @ xi)
            assert weights[8 * c : 8 * c + 8].sum() > 0.999  # the query's cluster ...
            assert weights.max() < 0.5  # ... averaged, not one pattern of it
            assert np.linalg.norm(xi - X[8 * c : 8 * c + 8].mean(0)) < 0.15
            # and it is a fixed point of the update
            np.testing.assert_allclose(np.asarray(hopfield_update(jnp.asarray(xi), jnp.asarray(X), 1.0)), xi, atol=1e-8)


# ----------------------------------------------------------------------------- Hopfield layer


def test_static_unnormalised_layer_is_the_closed_form():
    """Static patterns, no normalisation, no projections: Z = softmax(beta R Y^T) Y,
    with and without a separate pattern projection, one step."""
    rng = np.random.default_rng(2)
    R, Y, P = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 7, 8)), rng.standard_normal((2, 7, 8))
    layer = Hopfield(scaling=0.7, **STATIC)
    got = jrun(layer, {}, jnp.asarray(R, jnp.float32), jnp.asarray(Y, jnp.float32))
    want = np_softmax(0.7 * np.einsum("bld,bsd->bls", R, Y)) @ Y
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    got = jrun(layer, {}, *(jnp.asarray(a, jnp.float32) for a in (R, Y, P)))
    np.testing.assert_allclose(np.asarray(got), np_softmax(0.7 * np.einsum("bld,bsd->bls", R, Y)) @ P, rtol=1e-5, atol=1e-6)
    # default scaling of a fully static association is 1.0 (hflayers)
    got = jrun(Hopfield(**STATIC), {}, jnp.asarray(R, jnp.float32), jnp.asarray(Y, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np_softmax(np.einsum("bld,bsd->bls", R, Y)) @ Y, rtol=1e-5, atol=1e-6)


def reference_layer(p, R, Y, P, heads, beta, steps, eps=1e-4, hopfield_norm=False):
    """hflayers' forward written with numpy: LayerNorms, projections per head, the
    association-space iteration with per-row stopping, readout, output projection."""
    R = np_layer_norm(R, p, "norm_state")
    Y = np_layer_norm(Y, p, "norm_stored")
    P = np_layer_norm(P, p, "norm_projection")
    q = np.einsum("bld,dhe->bhle", R, p["state_proj"]["kernel"]) + p["state_proj"]["bias"][None, :, None]
    k = np.einsum("bsd,dhe->bhse", Y, p["stored_proj"]["kernel"]) + p["stored_proj"]["bias"][None, :, None]
    v = np.einsum("bsd,dhe->bhse", P, p["projection_proj"]["kernel"]) + p["projection_proj"]["bias"][None, :, None]
    if hopfield_norm:
        q, k = (np_layer_norm(a, p, "norm_hopfield") for a in (q, k))
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(q.shape[0]):
        for h in range(heads):
            for i in range(q.shape[2]):
                xi = np_softmax(beta * k[b, h] @ q[b, h, i])
                n = 0
                while steps is None or n < steps:
                    new = np_softmax(beta * k[b, h] @ (xi @ k[b, h]))
                    done = np.linalg.norm(new - xi) <= eps
                    xi, n = new, n + 1
                    if done:
                        break
                out[b, h, i] = xi @ v[b, h]
    return np.einsum("bhle,hef->blf", out, p["out_proj"]["kernel"]) + p["out_proj"]["bias"]


@pytest.mark.parametrize("steps,hopfield_norm", [(0, False), (3, True), (None, False)])
def test_projected_layer_matches_numpy_reference(steps, hopfield_norm):
    rng = np.random.default_rng(3)
    R, Y, P = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 6, 8)), rng.standard_normal((2, 6, 5))
    layer = Hopfield(
        num_heads=2, update_steps_max=steps, normalize_hopfield_space=hopfield_norm,
        normalize_hopfield_space_affine=hopfield_norm, kernel_init=nn.initializers.normal(0.7),
    )
    args = [jnp.asarray(a, jnp.float32) for a in (R, Y, P)]
    v = jinit(layer, 0, *args)
    v = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), v)  # non-trivial norms/biases
    got = jax.jit(layer.apply)(v, *args)
    want = reference_layer(unbox(v["params"]), R, Y, P, 2, 1 / np.sqrt(4), steps, hopfield_norm=hopfield_norm)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_iteration_is_differentiable_with_a_step_limit():
    """update_steps_max=3: jit(grad) equals central differences (float64)."""
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        layer = Hopfield(num_heads=2, update_steps_max=3, update_steps_eps=1e-12, kernel_init=nn.initializers.normal(0.5),
                         dtype=jnp.float64, param_dtype=jnp.float64)
        R, Y = jnp.asarray(rng.standard_normal((2, 3, 8))), jnp.asarray(rng.standard_normal((2, 5, 8)))
        v = jinit(layer, 0, R, Y)
        w = jnp.asarray(rng.standard_normal((2, 3, 8)))
        loss = jax.jit(lambda v, R: jnp.sum(jrun(layer, v, R, Y) * w))
        g = jax.grad(loss, argnums=(0, 1))(v, R)
        leaves, tree = jax.tree.flatten((v, R))
        dirs = [jnp.asarray(rng.standard_normal(a.shape)) for a in leaves]
        analytic = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree.leaves(g), dirs))

        def at(e):
            return loss(*jax.tree.unflatten(tree, [a + e * b for a, b in zip(leaves, dirs)]))

        numeric = float(at(1e-6) - at(-1e-6)) / 2e-6
        assert abs(analytic - numeric) <= 1e-6 * abs(numeric)


def test_masks():
    """A masked stored pattern is the same as an absent one; association_mask per query;
    a query with nothing to associate gets zeros (then the output bias)."""
    rng = np.random.default_rng(5)
    R, Y = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32), jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
    layer = Hopfield(num_heads=2, update_steps_max=2)
    v = jinit(layer, 0, R, Y)
    keep = np.array([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0]], bool)
    got = jrun(layer, v, R, Y, stored_pattern_mask=jnp.asarray(keep))
    for b in range(2):
        want = jrun(layer, v, R[b : b + 1], Y[b : b + 1, keep[b]])
        np.testing.assert_allclose(np.asarray(got[b : b + 1]), np.asarray(want), rtol=1e-5, atol=1e-6)
    am = np.ones((1, 1, 3, 6), bool)
    am[0, 0, 1, :4] = False
    am[0, 0, 2, :] = False
    got, xi = jrun(layer, v, R, Y, association_mask=jnp.asarray(am), return_associations=True)
    want = jrun(layer, v, R[:, 1:2], Y[:, 4:])
    np.testing.assert_allclose(np.asarray(got[:, 1:2]), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(xi[:, :, 2]), 0.0)
    bias = np.asarray(nn.meta.unbox(v["params"])["out_proj"]["bias"])
    np.testing.assert_allclose(np.asarray(got[:, 2]), np.broadcast_to(bias, (2, 8)), atol=1e-7)
    with pytest.raises(ValueError, match="stored_pattern_mask"):
        jrun(layer, v, R, Y, stored_pattern_mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="association_mask"):
        jrun(layer, v, R, Y, association_mask=jnp.ones((2, 3, 3, 6), bool))
    with pytest.raises(ValueError, match="stored_pattern"):
        jrun(layer, v, R, Y[:1])
    with pytest.raises(ValueError, match="state_pattern"):
        jrun(layer, v, R[0], Y)


def test_dropout_on_the_associations():
    rng = np.random.default_rng(6)
    R = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    plain = Hopfield(num_heads=2)
    v = jinit(plain, 0, R)
    v = jax.tree.map(lambda a: a + 0.1, v)
    drop = Hopfield(num_heads=2, dropout=0.5)
    np.testing.assert_allclose(np.asarray(jrun(drop, v, R, deterministic=True)), np.asarray(jrun(plain, v, R)), rtol=1e-6)
    with pytest.raises(ValueError, match="deterministic"):
        jrun(drop, v, R)
    a = jrun(drop, v, R, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = jrun(drop, v, R, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(a - b).max()) > 1e-4
    # rate 1 drops every association: the output is the output bias
    full = jrun(Hopfield(num_heads=2, dropout=1.0), v, R, deterministic=False, rngs={"dropout": jax.random.key(1)})
    bias = np.asarray(nn.meta.unbox(v["params"])["out_proj"]["bias"])
    np.testing.assert_allclose(np.asarray(full), np.broadcast_to(bias, full.shape), atol=1e-6)


def test_pooling_and_lookup_layers_are_hopfield_with_learned_patterns():
    rng = np.random.default_rng(7)
    Y = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
    R = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    base = Hopfield(num_heads=2, update_steps_max=1)

    pool = HopfieldPooling(num_heads=2, update_steps_max=1, quantity=3)
    v = jinit(pool, 0, Y)
    p = nn.meta.unbox(v["params"])
    queries = jnp.broadcast_to(p["pooling_weights"][None], (2, 3, 8))
    rest = {"params": {k: x for k, x in p.items() if k != "pooling_weights"}}
    np.testing.assert_allclose(
        np.asarray(jrun(pool, v, Y)), np.asarray(jrun(base, rest, queries, Y)).reshape(2, 24), rtol=1e-5, atol=1e-7
    )

    look = HopfieldLayer(num_heads=2, update_steps_max=1, quantity=5, lookup_weights_as_separated=True, trainable=False)
    v = jinit(look, 1, R)
    p = nn.meta.unbox(v["params"])
    stored = jnp.broadcast_to(p["lookup_weights"][None], (2, 5, 8))
    targets = jnp.broadcast_to(p["target_weights"][None], (2, 5, 8))
    rest = {"params": {k: x for k, x in p.items() if k not in ("lookup_weights", "target_weights")}}
    np.testing.assert_allclose(
        np.asarray(jrun(look, v, R)), np.asarray(jrun(base, rest, R, stored, targets)), rtol=1e-5, atol=1e-7
    )
    g = jax.jit(jax.grad(lambda v: jnp.sum(look.apply(v, R) ** 2)))(v)
    g = nn.meta.unbox(g["params"])
    assert float(jnp.abs(g["lookup_weights"]).max()) == 0.0  # trainable=False
    assert float(jnp.abs(g["target_weights"]).max()) > 0.0
