"""linear_scan: every backend equals a plain Python loop and the reference (values and
gradients), over shapes, odd lengths, broadcast decays, h0, resets and reverse."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import dispatch, linear_scan
from mnemax.kernels.linear_scan import BACKENDS


def loop_scan(a, b, h0=None, resets=None, reverse=False):
    """h_t = a_t h_{t-1} + b_t with plain Python loops over numpy (float64)."""
    a = np.broadcast_to(np.asarray(a, np.float64), b.shape)
    b = np.asarray(b, np.float64)
    B, T = b.shape[:2]
    out = np.zeros_like(b)
    for i in range(B):
        h = np.zeros(b.shape[2:]) if h0 is None else np.asarray(h0[i], np.float64)
        order = range(T - 1, -1, -1) if reverse else range(T)
        prev = None
        for t in order:
            # forward: the carry into t is cut at a reset at t; reverse: at a reset at t + 1.
            cut = resets is not None and (resets[i, t] if not reverse else (prev is not None and resets[i, prev]))
            if cut:
                h = np.zeros_like(h)
            h = a[i, t] * h + b[i, t]
            out[i, t] = h
            prev = t
    return out


def _inputs(key, shape, a_shape, with_h0, with_resets):
    ka, kb, kh, kr = jax.random.split(key, 4)
    a = jax.random.uniform(ka, a_shape, minval=0.5, maxval=1.0)
    b = jax.random.normal(kb, shape)
    h0 = jax.random.normal(kh, (shape[0],) + shape[2:]) if with_h0 else None
    resets = jax.random.bernoulli(kr, 0.2, shape[:2]) if with_resets else None
    return a, b, h0, resets


CASES = [
    # (b shape, a shape)
    ((2, 1, 3), (2, 1, 3)),
    ((3, 7, 5), (3, 7, 5)),
    ((2, 33, 4, 3), (2, 33, 4, 3)),
    ((2, 17, 6), (1, 1, 6)),  # time-invariant decay broadcast over batch and time
    ((1, 64, 8), (1, 64, 1)),  # decay shared across channels
]


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_h0,with_resets,reverse", list(itertools.product([False, True], repeat=3)))
def test_values_match_python_loop(backend, case, with_h0, with_resets, reverse):
    shape, a_shape = case
    a, b, h0, resets = _inputs(jax.random.key(hash((shape, a_shape)) % 2**31), shape, a_shape, with_h0, with_resets)
    want = loop_scan(a, b, None if h0 is None else np.asarray(h0), None if resets is None else np.asarray(resets), reverse)
    got = linear_scan(a, b, h0=h0, resets=resets, reverse=reverse, backend=backend)
    assert got.shape == b.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_h0,with_resets,reverse", list(itertools.product([False, True], repeat=3)))
def test_xla_gradients_match_reference(case, with_h0, with_resets, reverse):
    shape, a_shape = case
    key = jax.random.key(7 + len(shape))
    a, b, h0, resets = _inputs(key, shape, a_shape, with_h0, with_resets)
    w = jax.random.normal(jax.random.fold_in(key, 1), shape)

    def loss(backend):
        def f(a, b, h0):
            h = linear_scan(a, b, h0=h0, resets=resets, reverse=reverse, backend=backend)
            return jnp.sum(jnp.sin(h) * w)

        return f

    argnums = (0, 1, 2) if with_h0 else (0, 1)
    ref = jax.grad(loss("reference"), argnums)(a, b, h0)
    got = jax.grad(loss("xla"), argnums)(a, b, h0)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        rel = float(jnp.linalg.norm(g - r)) / max(float(jnp.linalg.norm(r)), 1e-12)
        assert rel <= 1e-5, rel


def test_gradients_match_finite_differences_float64():
    with jax.enable_x64(True):
        key = jax.random.key(3)
        a, b, h0, resets = _inputs(key, (2, 9, 3), (2, 9, 3), True, True)
        a, b, h0 = (x.astype(jnp.float64) for x in (a, b, h0))
        w = jax.random.normal(key, b.shape, jnp.float64)
        for backend, reverse in itertools.product(["reference", "xla"], [False, True]):

            def f(a, b, h0):
                return jnp.sum(jnp.tanh(linear_scan(a, b, h0=h0, resets=resets, reverse=reverse, backend=backend)) * w)

            grads = jax.grad(f, (0, 1, 2))(a, b, h0)
            dirs = [jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float64) for i, x in enumerate((a, b, h0))]
            eps = 1e-6
            plus = f(*(x + eps * d for x, d in zip((a, b, h0), dirs)))
            minus = f(*(x - eps * d for x, d in zip((a, b, h0), dirs)))
            numeric = (plus - minus) / (2 * eps)
            analytic = sum(jnp.sum(g * d) for g, d in zip(grads, dirs))
            assert abs(float(analytic - numeric)) <= 1e-7 * max(1.0, abs(float(numeric))), (backend, reverse)


def test_complex_and_bf16():
    key = jax.random.key(5)
    k1, k2, k3 = jax.random.split(key, 3)
    shape = (2, 13, 4)
    a = 0.9 * jnp.exp(1j * jax.random.uniform(k1, shape))
    b = jax.random.normal(k2, shape) + 1j * jax.random.normal(k3, shape)
    a_np, b_np = np.asarray(a), np.asarray(b)
    want = np.zeros_like(b_np)
    for i in range(shape[0]):
        h = np.zeros(shape[2:], complex)
        for t in range(shape[1]):
            h = a_np[i, t] * h + b_np[i, t]
            want[i, t] = h
    for backend in ("reference", "xla"):
        got = linear_scan(a, b, backend=backend)
        assert got.dtype == jnp.complex64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # complex gradients agree between the autodiff reference and the hand-written VJP
    w = jax.random.normal(k1, shape)

    def f(backend):
        return lambda a, b: jnp.sum(jnp.real(linear_scan(a, b, backend=backend)) * w)

    for g, r in zip(jax.grad(f("xla"), (0, 1))(a, b), jax.grad(f("reference"), (0, 1))(a, b)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    # bf16 inputs: float32 arithmetic, bf16 result
    ab, bb = jnp.full(shape, 0.9, jnp.bfloat16), jax.random.normal(k2, shape, jnp.bfloat16)
    got = linear_scan(ab, bb, backend="xla")
    assert got.dtype == jnp.bfloat16
    want = loop_scan(np.asarray(ab, np.float32), np.asarray(bb, np.float32))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


def test_bad_inputs_name_the_argument():
    b = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match="^a must"):
        linear_scan(jnp.ones((2, 5, 4)), b)
    with pytest.raises(ValueError, match="^b must"):
        linear_scan(jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="^h0 must"):
        linear_scan(b, b, h0=jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="^resets must"):
        linear_scan(b, b, resets=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="backend"):
        linear_scan(b, b, backend="cuda")


def test_dispatch_defaults_and_env_override(monkeypatch):
    assert BACKENDS.available() == ("reference", "xla", "pallas_gpu", "pallas_tpu")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert BACKENDS.default("cpu") == "xla"
    assert BACKENDS.default("gpu") == "pallas_gpu" and BACKENDS.default("tpu") == "pallas_tpu"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert BACKENDS.default() == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        linear_scan(jnp.ones((1, 2, 1)), jnp.ones((1, 2, 1)))


ALL_BACKENDS = ["reference", "xla", "pallas_gpu", "pallas_tpu"]
# row 0 resets at steps 0, 2 and 3; no reset at step 1 (a reverse scan split between steps 0
# and 1 must not be cut there, since the carry into step 0 is dropped at a reset at step 1)
STEP_RESETS = jnp.asarray([[True, False, True, True], [False, False, False, False]])


def _step_case(seed=11):
    key = jax.random.key(seed)
    a, b, h0, _ = _inputs(key, (2, 4, 3, 2), (2, 4, 3, 2), True, False)
    return a, b, h0


def _scan(a, b, h0, resets, reverse, backend):
    return linear_scan(a, b, h0=h0, resets=resets, reverse=reverse, backend=backend, interpret=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward_scan", "reverse_scan"])
def test_one_step_equals_the_multi_step_call(backend, reverse):
    # generation: a one-step call from the state the rest of the sequence left (forward: after
    # steps 0-2, the step 3; reverse: the carry out of steps 3-1, the step 0) equals the same
    # backend's 4-step call at that step, in a row with a reset there and one without, and it
    # runs no kernel (no pallas_call)
    a, b, h0 = _step_case()
    full = _scan(a, b, h0, STEP_RESETS, reverse, backend)
    if reverse:
        rest = _scan(a[:, 1:], b[:, 1:], h0, STEP_RESETS[:, 1:], reverse, backend)[:, 0]
        step = slice(0, 1)
    else:
        rest = _scan(a[:, :3], b[:, :3], h0, STEP_RESETS[:, :3], reverse, backend)[:, -1]
        step = slice(3, 4)
    one = _scan(a[:, step], b[:, step], rest, STEP_RESETS[:, step], reverse, backend)
    assert one.shape == (2, 1, 3, 2)
    np.testing.assert_allclose(np.asarray(one), np.asarray(full[:, step]), rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda h: _scan(a[:, step], b[:, step], h, STEP_RESETS[:, step], reverse, backend))(rest))
    assert "pallas_call" not in jaxpr


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward_scan", "reverse_scan"])
def test_one_step_gradients_equal_the_sequential_reference(backend, reverse):
    # the gradients of the closed form (plain jnp, differentiated by JAX) against the
    # reference's lax.scan on the same step (mnemax.kernels.linear_scan.reference.scan): a
    # forward step drops h0 in the row that resets there (its gradient is 0), a reverse step
    # keeps it (its cut would come from a later step)
    from mnemax.kernels.linear_scan import reference

    a, b, h0 = _step_case(seed=12)
    a, b, r = a[:, 3:], b[:, 3:], STEP_RESETS[:, 3:]
    w = jax.random.normal(jax.random.key(1), b.shape)
    got = jax.grad(lambda *v: jnp.sum(jnp.tanh(_scan(*v, r, reverse, backend)) * w), (0, 1, 2))(a, b, h0)
    want = jax.grad(lambda *v: jnp.sum(jnp.tanh(reference.scan(v[0], v[1], h0=v[2], resets=r, reverse=reverse)) * w),
                    (0, 1, 2))(a, b, h0)
    for name, g, r_ in zip(("a", "b", "h0"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r_), rtol=1e-6, atol=1e-7, err_msg=f"gradient of {name}")
    assert (float(jnp.max(jnp.abs(got[2][0]))) == 0.0) == (not reverse)
