"""The layer-contract checker every sequence mixer and zoo model must pass.

``check_layer_contract(make_layer, make_input)`` checks, against the layer's own
full-sequence call (the independent reference for the streaming paths):

1. streaming: one call over T steps == the sequence fed in 2, 3 and 4 pieces with
   the state carried == a prefill then one-token steps (outputs and final state);
2. resets: a reset in the middle of row b == row b's two halves run as separate
   sequences, a reset at step 0 clears a non-empty state, and streaming with resets
   == one call with resets;
3. ``initial_state(batch)`` on the unbound module has the structure, shapes and
   dtypes of the state a call returns, and passing it equals passing ``state=None``;
4. ``jax.jit`` gives the eager result; gradients are finite, and in float64 the
   gradient (params, float inputs and incoming state) equals central finite
   differences along a random direction;
5. bad shapes (inputs, resets, a state for another batch size) raise ValueError
   naming the argument;
6. the layer works inside a user-written ``nn.Module`` (same numbers as standalone),
   under ``nn.remat`` (same outputs and gradients), and in a jitted optax training
   step with truncated BPTT (the loss goes down).

``make_layer(**kwargs)`` must build a fresh unbound module and forward ``kwargs``
(``name``, ``dtype``, ``param_dtype``) to it; ``make_input(rng, batch, time)`` makes
inputs in float32 (or int tokens) from a ``numpy.random.Generator``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


def _assert_close(got, want, rtol, atol, what):
    got_l, got_t = jax.tree.flatten(got)
    want_l, want_t = jax.tree.flatten(want)
    assert got_t == want_t, f"{what}: structure {got_t} != {want_t}"
    for i, (g, w) in enumerate(zip(got_l, want_l)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"{what} leaf {i}: shape {g.shape} != {w.shape}"
        if np.issubdtype(w.dtype, np.inexact):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what} leaf {i}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{what} leaf {i}")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _float_leaves(tree):
    """The floating leaves of ``tree`` and a function that puts new ones back."""
    leaves, treedef = jax.tree.flatten(tree)
    idx = [i for i, leaf in enumerate(leaves) if _is_float(leaf)]

    def rebuild(floats):
        new = list(leaves)
        for i, f in zip(idx, floats):
            new[i] = f
        return jax.tree.unflatten(treedef, new)

    return [leaves[i] for i in idx], rebuild


def _split_apply(apply, variables, x, sizes, state=None, resets=None):
    ys, t = [], 0
    for n in sizes:
        r = None if resets is None else resets[:, t : t + n]
        y, state = apply(variables, x[:, t : t + n], state, r)
        ys.append(y)
        t += n
    return np.concatenate([np.asarray(y) for y in ys], axis=1), state


def _rebuild(module: nn.Module, cls=None, **changes):
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}
    fields.update(changes)
    return (cls or type(module))(**fields)


def check_layer_contract(
    make_layer: Callable[..., nn.Module],
    make_input: Callable[[jax.Array, int, int], jax.Array],
    *,
    batch: int = 2,
    time: int = 11,
    rtol: float = 2e-5,
    atol: float = 2e-5,
    fd_rtol: float = 1e-6,
    input_name: str = "x",
    train_steps: int = 8,
    seed: int = 0,
) -> None:
    if time < 9:
        raise ValueError(f"time must be >= 9 so that the sequence splits into 4 pieces, got {time}")
    # Test data comes from numpy (jax.random compiles slowly on CPU); params from jax.
    rng = np.random.default_rng(seed)
    k_init = jax.random.key(seed)
    layer = make_layer()
    # inputs, resets and the checks' reductions stay in numpy: each eager jnp op on a new
    # shape (slicing the pieces, zeros per length, isfinite per leaf) would compile a program
    x = np.asarray(make_input(rng, batch, time))
    variables = jax.jit(layer.init)(k_init, x)

    def eager_apply(v, x, state=None, resets=None):
        return layer.apply(v, x, state, resets)

    # Everything below runs jitted (op-by-op eager execution compiles every primitive
    # for every shape, which is far slower on CPU); one eager call is checked in 4. Every
    # call but the first two passes its state and resets explicitly (``initial_state`` and
    # all-false resets where there are none), so that one program per length serves the
    # streaming, reset and initial-state checks: compiles are most of the checker's time.
    apply = jax.jit(eager_apply)
    y_full, s_full = apply(variables, x)
    s0 = make_layer().initial_state(batch)
    no_resets = lambda n: np.zeros((batch, n), bool)  # noqa: E731

    def japply(v, x, state=None, resets=None):
        state = s0 if state is None else state
        return apply(v, x, state, no_resets(x.shape[1]) if resets is None else resets)

    # --- 3. initial_state (first: the explicit form below stands in for state=None) -----
    assert jax.tree.structure(s0) == jax.tree.structure(s_full), "initial_state structure != returned state's"
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s_full)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"initial_state leaf {a.shape}/{a.dtype} != {b.shape}/{b.dtype}"
        if jnp.issubdtype(a.dtype, jnp.floating):
            assert a.dtype == jnp.float32, f"state leaves must be float32, got {a.dtype}"
    y0, st0 = japply(variables, x)
    _assert_close(y0, y_full, rtol, atol, "outputs with initial_state and all-false resets vs state=None, resets=None")
    _assert_close(st0, s_full, rtol, atol, "final state with initial_state and all-false resets vs None, None")

    # --- 1. streaming -----------------------------------------------------------------
    splits = [(time // 2, time - time // 2), (3, time - 7, 4), (1, 4, time - 8, 3)]
    for sizes in splits:
        assert sum(sizes) == time and min(sizes) > 0
        y, s = _split_apply(japply, variables, x, sizes)
        _assert_close(y, y_full, rtol, atol, f"outputs, pieces {sizes}")
        _assert_close(s, s_full, rtol, atol, f"final state, pieces {sizes}")
    prefill = time // 2
    y, s = _split_apply(japply, variables, x, (prefill,) + (1,) * (time - prefill))
    _assert_close(y, y_full, rtol, atol, "outputs, prefill + one-token steps")
    _assert_close(s, s_full, rtol, atol, "final state, prefill + one-token steps")

    # --- 2. resets ----------------------------------------------------------------------
    # rows cut at time // 2 and time - time // 2 in turn (resets are per row); each row's
    # halves are the whole batch's halves at that cut, run as fresh sequences, read at row b
    cuts = [time // 2 + (b % 2) * (time - 2 * (time // 2)) for b in range(batch)]
    resets = np.zeros((batch, time), bool)
    resets[np.arange(batch), cuts] = True
    y_r, s_r = japply(variables, x, None, resets)
    for b, c in enumerate(cuts):
        y_a, _ = japply(variables, x[:, :c])
        y_b, s_b = japply(variables, x[:, c:])
        row = lambda t: jax.tree.map(lambda l: l[b : b + 1], t)  # noqa: E731
        _assert_close(y_r[b : b + 1, :c], y_a[b : b + 1], rtol, atol, f"row {b}: outputs before the reset at {c}")
        _assert_close(y_r[b : b + 1, c:], y_b[b : b + 1], rtol, atol, f"row {b}: outputs after the reset at {c}")
        _assert_close(row(s_r), row(s_b), rtol, atol, f"row {b}: final state after a reset")
    y, s = _split_apply(japply, variables, x, (3, time - 7, 4), resets=resets)
    _assert_close(y, y_r, rtol, atol, "outputs, pieces with resets")
    _assert_close(s, s_r, rtol, atol, "final state, pieces with resets")
    x2 = np.asarray(make_input(rng, batch, time))
    first = np.zeros((batch, time), bool)
    first[:, 0] = True
    y_clear, _ = japply(variables, x2, s_full, first)
    y_fresh, _ = apply(variables, x2)
    _assert_close(y_clear, y_fresh, rtol, atol, "a reset at step 0 clears the carried state")

    # --- 4. jit and gradients -------------------------------------------------------------
    ye, se = eager_apply(variables, x)
    _assert_close(ye, y_full, rtol, atol, "jit vs eager outputs")
    _assert_close(se, s_full, rtol, atol, "jit vs eager state")

    def scalar_loss(v, x, state, w_y):
        y, s = layer.apply(v, x, state)
        total = jnp.sum(y.astype(w_y.dtype) * w_y)
        for leaf in jax.tree.leaves(s):
            if _is_float(leaf):
                total = total + 0.1 * jnp.sum(jnp.sin(leaf))
        return total

    w_y = jnp.asarray(rng.standard_normal(y_full.shape), jnp.float32)
    floats, rebuild = _float_leaves((variables, x, s_full))
    grads = jax.jit(jax.grad(lambda f: scalar_loss(*rebuild(f), w_y)))(floats)
    for leaf in grads:
        assert np.all(np.isfinite(np.asarray(leaf))), "non-finite gradient"
    g_params = rebuild(grads)[0]  # the parameters' part of the same gradient
    assert any(np.abs(np.asarray(l)).max() > 0 for l in jax.tree.leaves(g_params)), "all parameter gradients are zero"
    _check_finite_differences(make_layer, make_input, variables, s_full, batch, min(time, 7), fd_rtol, seed)

    # --- 5. bad inputs ----------------------------------------------------------------------
    bad_x = x[..., 0] if x.ndim == 3 else x[..., None]
    with pytest.raises(ValueError, match=input_name):
        apply(variables, bad_x)
    with pytest.raises(ValueError, match="resets"):
        apply(variables, x, None, jnp.zeros((batch, time + 1), bool))
    if jax.tree.leaves(s0):
        with pytest.raises(ValueError, match="state"):
            apply(variables, x, make_layer().initial_state(batch + 1))

    # --- 6. inside a user module, under remat, in an optax step ----------------------------
    class UserModel(nn.Module):
        @nn.compact
        def __call__(self, x, state=None, resets=None):
            y, state = make_layer(name="inner")(x, state, resets)
            return nn.Dense(3, name="readout")(y.astype(jnp.float32)), state

    user = UserModel()
    uv = jax.jit(user.init)(k_init, x)
    uy, us = jax.jit(user.apply)(uv, x)
    inner_vars = {"params": uv["params"]["inner"]}
    y_inner, s_inner = apply(inner_vars, x)
    readout = uv["params"]["readout"]
    want = np.asarray(y_inner, np.float32) @ np.asarray(readout["kernel"]) + np.asarray(readout["bias"])
    _assert_close(uy, want, 1e-5, 1e-5, "user module outputs")
    _assert_close(us, s_inner, rtol, atol, "user module state")

    remat_layer = _rebuild(layer, nn.remat(type(layer)))
    yr, sr = jax.jit(remat_layer.apply)(variables, x)
    _assert_close(yr, y_full, rtol, atol, "remat outputs")
    g_plain = g_params

    def remat_loss(v):
        y, s = remat_layer.apply(v, x, s_full)
        total = jnp.sum(y.astype(jnp.float32) * w_y)
        for leaf in jax.tree.leaves(s):
            if _is_float(leaf):
                total = total + 0.1 * jnp.sum(jnp.sin(leaf))
        return total

    g_remat = jax.jit(jax.grad(remat_loss))(variables)
    _assert_close(g_remat, g_plain, 1e-4, 1e-5, "remat gradients")

    target = rng.standard_normal((batch, time, 3)).astype(np.float32)
    opt = optax.adam(1e-2)
    params = uv
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, state, xs, ts):
        def loss_fn(p):
            y, new_state = user.apply(p, xs, state)
            return jnp.mean((y - ts) ** 2), new_state

        (loss, new_state), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jax.lax.stop_gradient(new_state), loss

    half = time // 2
    losses = []
    for _ in range(train_steps):
        state, step_loss = s0, 0.0  # (initial_state, not None: one signature, one compile)
        for lo, hi in ((0, half), (half, 2 * half)):  # truncated BPTT over two segments of one length
            params, opt_state, state, loss = train_step(params, opt_state, state, x[:, lo:hi], target[:, lo:hi])
            step_loss += float(loss)
        losses.append(step_loss)
    assert np.all(np.isfinite(losses)), f"training produced non-finite losses {losses}"
    assert losses[-1] < losses[0], f"loss did not go down in {train_steps} optax steps: {losses}"


def _check_finite_differences(make_layer, make_input, variables, state, batch, time, fd_rtol, seed):
    """Directional derivative of a random projection of (outputs, final state) along a
    random direction in (params, float inputs, incoming state): reverse-mode gradient vs
    central differences, in float64, at the float32 check's parameters and final state
    (a non-trivial incoming state) cast to the float64 layer's dtypes (no second init or
    prefix run to compile)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed + 1)
        layer = make_layer(dtype=jnp.float64, param_dtype=jnp.float64)
        x = make_input(rng, batch, time)
        if _is_float(x):
            x = x.astype(jnp.float64)
        variables = jax.tree.map(lambda p: p.astype(jnp.float64) if _is_float(p) else p, variables)
        y, state_shape = jax.eval_shape(layer.apply, variables, x)
        state = jax.tree.map(lambda s, like: jnp.asarray(s).astype(like.dtype), state, state_shape)
        w_y = jnp.asarray(rng.standard_normal(y.shape), jnp.float64)

        def loss(v, x, s):
            y, s2 = layer.apply(v, x, s)
            total = jnp.sum(y.astype(jnp.float64) * w_y)
            for leaf in jax.tree.leaves(s2):
                if _is_float(leaf):
                    total = total + 0.1 * jnp.sum(jnp.sin(leaf))
            return total

        floats, rebuild = _float_leaves((variables, x, state))
        direction = [jnp.asarray(rng.standard_normal(f.shape), jnp.float64) for f in floats]

        # one program (value and gradient) for the gradient and both differences
        value_and_grad = jax.jit(jax.value_and_grad(lambda fl: loss(*rebuild(fl))))

        def flat_loss(fl):
            return value_and_grad(fl)[0]

        grads = value_and_grad(floats)[1]
        analytic = sum(float(np.sum(np.asarray(g) * np.asarray(d))) for g, d in zip(grads, direction))

        @jax.jit
        def along(eps):
            return [f + eps * d for f, d in zip(floats, direction)]

        eps = 1e-6
        numeric = (flat_loss(along(eps)) - flat_loss(along(-eps))) / (2 * eps)
        err = abs(analytic - float(numeric)) / max(abs(float(numeric)), 1e-8)
        assert err <= fd_rtol, f"gradient vs finite differences: {analytic} vs {float(numeric)} (rel err {err:.2e})"


def primitives(jaxpr) -> set[str]:
    """Names of every primitive in ``jaxpr`` and the jaxprs nested in its equations
    (jit, custom_vjp, shard_map, scan bodies, ...)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= primitives(inner)
    return names
