"""LSSL family: HiPPO matrices and discretisations equal their closed forms (float64); the
LSSL's convolutional and recurrent views agree; HiPPO memories read back a signal's
history; the diagonal SSM equals a Python loop and its two views agree; LSSL and S4D pass
the contract."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import mnemax
from mnemax.layers.ssm import (
    LSSL,
    DiagonalSSM,
    DiagonalSSMState,
    LSSLState,
    causal_fft_conv,
    discretize,
    hippo,
    krylov,
    legs_memory,
    reconstruct,
)

from .contract import check_layer_contract


def float_input(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make


# ----------------------------------------------------------------------------- HiPPO, discretisation


def closed_form(measure, N):
    """The HiPPO matrices entry by entry (Gu et al. 2020, App. D; s4's transition())."""
    A, B = np.zeros((N, N)), np.zeros(N)
    for n in range(N):
        for k in range(N):
            if measure == "legs":
                A[n, k] = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k else (-(n + 1) if n == k else 0.0)
            elif measure == "legt":
                A[n, k] = -0.5 * math.sqrt((2 * n + 1) * (2 * k + 1)) * (1.0 if n >= k else (-1.0) ** (n - k))
            else:
                A[n, k] = -1.0 if n > k else (-0.5 if n == k else 0.0)
        B[n] = {"legs": math.sqrt(2 * n + 1), "legt": 0.5 * math.sqrt(2 * n + 1), "lagt": 1.0}[measure]
    return A, B


@pytest.mark.parametrize("measure", ["legs", "legt", "lagt"])
def test_hippo_equals_closed_form(measure):
    for N in (1, 2, 7, 16):
        A, B = hippo(measure, N)
        A_want, B_want = closed_form(measure, N)
        np.testing.assert_allclose(A, A_want, rtol=1e-14, atol=0)
        np.testing.assert_allclose(B, B_want, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="measure"):
        hippo("fourier", 4)


def test_legt_is_the_sliding_window_projection():
    """d/dt of the window-[t-2, t] Legendre coefficients, computed by quadrature for a
    polynomial f of degree < N, equals A c + B f(t) exactly."""
    N, t = 6, 3.0
    A, B = hippo("legt", N)
    f = np.polynomial.Polynomial([0.3, -1.0, 0.5, 0.2])
    xg, wg = np.polynomial.legendre.leggauss(20)

    def coeffs(t):
        s = t - 1 + xg  # the window [t - 2, t] with x in [-1, 1]
        P = np.stack([np.sqrt(2 * n + 1) * np.polynomial.legendre.Legendre.basis(n)(xg) for n in range(N)])
        return (P * f(s) * wg).sum(1) / 2

    h = 1e-5
    dc = (coeffs(t + h) - coeffs(t - h)) / (2 * h)
    np.testing.assert_allclose(dc, A @ coeffs(t) + B * f(t), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("method,alpha", [("bilinear", 0.5), ("forward_euler", 0.0), ("backward_euler", 1.0), ("gbt", 0.3)])
def test_gbt_equals_formula(method, alpha):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        A = rng.standard_normal((3, 5, 5)) - 2 * np.eye(5)
        B = rng.standard_normal((3, 5))
        dt = np.array([0.01, 0.1, 0.7])
        Ab, Bb = discretize(A, B, dt, method, alpha if method == "gbt" else None)
        for h in range(3):
            inv = np.linalg.inv(np.eye(5) - alpha * dt[h] * A[h])
            np.testing.assert_allclose(np.asarray(Ab[h]), inv @ (np.eye(5) + (1 - alpha) * dt[h] * A[h]), rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(np.asarray(Bb[h]), dt[h] * inv @ B[h], rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="alpha"):
        discretize(A, B, 0.1, "gbt")


def test_zoh_equals_expm_and_block_matrix():
    with jax.enable_x64(True):
        A, B = hippo("legs", 6)
        for dt in (1e-3, 0.05, 0.9):
            Ab, Bb = discretize(A, B, dt, "zoh")
            E = scipy.linalg.expm(dt * A)
            np.testing.assert_allclose(np.asarray(Ab), E, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(np.asarray(Bb), np.linalg.solve(A, (E - np.eye(6)) @ B), rtol=1e-10, atol=1e-12)
            block = np.zeros((7, 7))
            block[:6, :6], block[:6, 6] = A, B
            np.testing.assert_allclose(np.asarray(Bb), scipy.linalg.expm(dt * block)[:6, 6] / 1.0, rtol=1e-12, atol=1e-13)
        # singular A (the integrator x' = u): Bbar = dt B
        Ab, Bb = discretize(np.zeros((2, 2)), np.array([1.0, 2.0]), 0.25, "zoh")
        np.testing.assert_allclose(np.asarray(Ab), np.eye(2))
        np.testing.assert_allclose(np.asarray(Bb), [0.25, 0.5])


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_discretize_gradients_match_finite_differences(method):
    """Trained A, B and dt (LSSL ``learn=1/2``) differentiate through expm / the solve."""
    with jax.enable_x64(True):
        A, B = hippo("legs", 6)
        rng = np.random.default_rng(5)
        dA, dB = rng.standard_normal((6, 6)), rng.standard_normal(6)

        @jax.jit
        def f(s):
            Ab, Bb = discretize(A + s * dA, B + s * dB, 0.3 + 0.1 * s, method)
            return jnp.sum(jnp.sin(Ab)) + jnp.sum(Bb**2)

        numeric = (f(1e-6) - f(-1e-6)) / 2e-6
        np.testing.assert_allclose(float(jax.jit(jax.grad(f))(0.0)), float(numeric), rtol=1e-6)


def test_krylov_equals_matrix_powers():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        A = rng.standard_normal((2, 4, 4)) / 3
        b = rng.standard_normal((2, 4))
        for L in (1, 2, 5, 8, 13):
            got = np.asarray(krylov(L, jnp.asarray(A), jnp.asarray(b)))
            want = np.stack([np.stack([np.linalg.matrix_power(A[h], l) @ b[h] for l in range(L)]) for h in range(2)])
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- LSSL views, memory


@pytest.mark.parametrize("measure,method,learn", [("legs", "bilinear", 0), ("legt", "zoh", 2)])
def test_lssl_conv_view_equals_recurrent_view(measure, method, learn):
    """Outputs and final state, from a fresh and from a given state, float64: rel. err <= 1e-8."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        kw = dict(features=3, state_size=8, channels=2, measure=measure, method=method, learn=learn, dt_min=0.01, dt_max=0.5,
                  dtype=jnp.float64, param_dtype=jnp.float64)
        conv, rec = LSSL(mode="conv", **kw), LSSL(mode="recurrent", **kw)
        u = jnp.asarray(rng.standard_normal((2, 37, 3)))
        v = jax.jit(conv.init)(jax.random.key(0), u)
        x0 = LSSLState(jnp.asarray(rng.standard_normal((2, 3, 8))))
        for state in (None, x0):
            (yc, sc), (yr, sr) = jax.jit(conv.apply)(v, u, state), jax.jit(rec.apply)(v, u, state)
            err_y = float(jnp.abs(yc - yr).max() / jnp.abs(yr).max())
            err_s = float(jnp.abs(sc.x - sr.x).max() / jnp.abs(sr.x).max())
            assert err_y <= 1e-8 and err_s <= 1e-8, (err_y, err_s)


def test_lssl_conv_view_in_feature_groups_equals_recurrent_view(monkeypatch):
    """Above KRYLOV_GROUP_ELEMS the conv view builds the Krylov powers in feature groups
    (lax.map, rematerialised): 5 features in groups of 2 (a remainder of 1), float64. Outputs,
    final state and the gradients of every parameter and of the input equal the recurrent
    view's (rel. err <= 1e-8)."""
    from mnemax.layers import lssl as lssl_mod

    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        T, N = 29, 8
        monkeypatch.setattr(lssl_mod, "KRYLOV_GROUP_ELEMS", 2 * T * N)
        kw = dict(features=5, state_size=N, channels=2, learn=2, dt_min=0.01, dt_max=0.5, dtype=jnp.float64,
                  param_dtype=jnp.float64)
        conv, rec = LSSL(mode="conv", **kw), LSSL(mode="recurrent", **kw)
        u = jnp.asarray(rng.standard_normal((2, T, 5)))
        v = conv.init(jax.random.key(0), u)
        w = jnp.asarray(rng.standard_normal((2, T, 5)))

        def loss(layer, v, u):
            y, st = layer.apply(v, u)
            return jnp.sum(y * w) + jnp.sum(st.x ** 2)

        (yc, sc), (yr, sr) = jax.jit(conv.apply)(v, u), jax.jit(rec.apply)(v, u)
        assert float(jnp.abs(yc - yr).max() / jnp.abs(yr).max()) <= 1e-8
        assert float(jnp.abs(sc.x - sr.x).max() / jnp.abs(sr.x).max()) <= 1e-8
        gc = jax.jit(jax.grad(functools.partial(loss, conv), argnums=(0, 1)))(v, u)
        gr = jax.jit(jax.grad(functools.partial(loss, rec), argnums=(0, 1)))(v, u)
        for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gr)):
            assert float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-300)) <= 1e-8


def test_lssl_auto_mode_steps_short_calls_recurrently():
    """mode="auto": calls of at most AUTO_RECURRENT_STEPS steps (generation) take the recurrent
    view (no FFT in the traced call) and longer ones the conv view; both equal the conv view's
    values from a given state (float64, rel. err <= 1e-8)."""
    from mnemax.layers.lssl import AUTO_RECURRENT_STEPS

    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        kw = dict(features=3, state_size=8, channels=2, dt_min=0.01, dt_max=0.5, dtype=jnp.float64, param_dtype=jnp.float64)
        auto, conv = LSSL(**kw), LSSL(mode="conv", **kw)
        v = jax.jit(auto.init)(jax.random.key(0), jnp.zeros((2, 4, 3)))
        x0 = LSSLState(jnp.asarray(rng.standard_normal((2, 3, 8))))
        for steps, want_fft in ((1, False), (AUTO_RECURRENT_STEPS, False), (AUTO_RECURRENT_STEPS + 1, True)):
            u = jnp.asarray(rng.standard_normal((2, steps, 3)))
            jaxpr = str(jax.make_jaxpr(auto.apply)(v, u, x0))
            assert ("fft" in jaxpr) == want_fft, steps
            (ya, sa), (yc, sc) = jax.jit(auto.apply)(v, u, x0), jax.jit(conv.apply)(v, u, x0)
            assert float(jnp.abs(ya - yc).max() / jnp.abs(yc).max()) <= 1e-8, steps
            assert float(jnp.abs(sa.x - sc.x).max() / jnp.abs(sc.x).max()) <= 1e-8, steps


@pytest.mark.parametrize("scan_layers", [pytest.param(False, marks=pytest.mark.slow), True])
def test_lssl_cached_discretisation_generates_the_same_tokens(scan_layers):
    """cache_discretized: the lssl zoo model's (Abar, Bbar) computed once; prefill and 6
    one-token steps from the cached variables equal the uncached ones (rel. 1e-6, float32)
    and trace no linear solve; init stores no cache; a model without LSSL layers is
    returned unchanged."""
    import mnemax
    from mnemax.layers import cache_discretized

    model = mnemax.create("lssl-tiny", scan_layers=scan_layers)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 30)), jnp.int32)
    v = jax.jit(model.init)(jax.random.key(0), tokens[:, :4])
    assert set(v) == {"params"}
    cached = cache_discretized(model, v, tokens[:, :1])
    assert set(cached) == {"params", "discretized"}
    step = lambda var, t, s: model.apply(var, t, s)  # noqa: E731
    solves = lambda var: re.findall(r"=\s*lu\b", str(jax.make_jaxpr(step)(var, tokens[:, :1], None)))  # noqa: E731
    assert solves(v) and not solves(cached)
    outs = {}
    for name, var in (("plain", v), ("cached", cached)):
        f = jax.jit(step)
        y, s = f(var, tokens[:, :24], None)
        ys = [y]
        for t in range(24, 30):
            y, s = f(var, tokens[:, t : t + 1], s)
            ys.append(y)
        outs[name] = np.concatenate([np.asarray(y, np.float32) for y in ys], axis=1)
    np.testing.assert_allclose(outs["cached"], outs["plain"], rtol=1e-6, atol=1e-6)
    m = mnemax.create("mamba-tiny")
    vm = jax.jit(m.init)(jax.random.key(0), tokens[:, :4])
    assert cache_discretized(m, vm, tokens[:, :1]) is vm


def test_lssl_recurrent_view_equals_python_loop():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        layer = LSSL(features=2, state_size=4, channels=2, activation="none", mode="recurrent", dt_min=0.05, dt_max=0.2,
                     dtype=jnp.float64, param_dtype=jnp.float64)
        u = jnp.asarray(rng.standard_normal((1, 6, 2)))
        v = layer.init(jax.random.key(1), u)
        y, s = layer.apply(v, u)
        p = jax.tree.map(np.asarray, mnemax_unbox(v)["params"])
        A, B = hippo("legs", 4)
        z = np.zeros((6, 4))  # (time, H * M) before the output linear
        for h in range(2):
            dt = math.exp(p["log_dt"][h])
            inv = np.linalg.inv(np.eye(4) - dt / 2 * A)
            Ab, Bb = inv @ (np.eye(4) + dt / 2 * A), dt * inv @ B
            x = np.zeros(4)
            for t in range(6):
                x = Ab @ x + Bb * float(u[0, t, h])
                for m in range(2):
                    z[t, h * 2 + m] = p["C"][h, m] @ x + p["D"][h, m] * float(u[0, t, h])
            np.testing.assert_allclose(np.asarray(s.x[0, h]), x, rtol=1e-12)
        want = z @ p["output_linear"]["kernel"] + p["output_linear"]["bias"]
        np.testing.assert_allclose(np.asarray(y[0]), want, rtol=1e-12, atol=1e-12)


def mnemax_unbox(v):
    import flax.linen as nn

    return nn.meta.unbox(v)


def smooth_signal(s):
    return np.sin(6 * np.pi * s) + 0.5 * np.cos(10 * np.pi * s + 1) + s**2


def test_legs_memory_reconstructs_history():
    """N = 64 LegS state after L = 1000 samples of a smooth signal reads back all 1000
    samples with relative L2 error < 1e-2 (measured 6.4e-3, bilinear; the error is the
    O(1/L) discretisation error of the time-varying recurrence)."""
    with jax.enable_x64(True):
        L, N = 1000, 64
        k = np.arange(1, L + 1)
        u = smooth_signal(k / L)
        states = jax.jit(lambda u: legs_memory(u, N))(jnp.asarray(u))
        rec = np.asarray(reconstruct(states[-1], k / L))
        err = np.linalg.norm(rec - u) / np.linalg.norm(u)
        assert err < 1e-2, err
        # a mid-way state reads back the first half on its own [0, t] window
        half = np.asarray(reconstruct(states[L // 2 - 1], k[: L // 2] / (L // 2)))
        assert np.linalg.norm(half - u[: L // 2]) / np.linalg.norm(u[: L // 2]) < 2e-2
        # too few coefficients cannot hold it: N = 4 leaves a large error
        small = np.asarray(reconstruct(jax.jit(lambda u: legs_memory(u, 4))(jnp.asarray(u))[-1], k / L))
        assert np.linalg.norm(small - u) / np.linalg.norm(u) > 0.3


def test_legt_lssl_system_remembers_the_last_window():
    """The LTI LegT system that an LSSL feature runs (bilinear, dt = 2 / W): after 3 W
    steps its N = 64 state reads back the last W = 500 samples with rel. error < 1e-3
    (measured 4.9e-4)."""
    with jax.enable_x64(True):
        N, W = 64, 500
        A, B = hippo("legt", N)
        Ab, Bb = discretize(A, B, 2.0 / W, "bilinear")
        u = np.sin(2 * np.pi * 1.5 * np.arange(3 * W) / W) + 0.3 * np.cos(2 * np.pi * 3.2 * np.arange(3 * W) / W)
        layer_state = jax.jit(lambda u: jax.lax.scan(lambda x, ut: (Ab @ x + Bb * ut, None), jnp.zeros(N), u)[0])(jnp.asarray(u))
        idx = np.arange(2 * W, 3 * W)
        rec = np.asarray(reconstruct(layer_state, 1 - (3 * W - 1 - idx + 0.5) / W))
        err = np.linalg.norm(rec - u[idx]) / np.linalg.norm(u[idx])
        assert err < 1e-3, err


# ----------------------------------------------------------------------------- diagonal SSM


@pytest.mark.parametrize("a_init", ["lin", "inv", "real"])
def test_diagonal_ssm_equals_python_loop(a_init):
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        layer = DiagonalSSM(features=2, state_size=4, a_init=a_init, activation="none", dt_min=0.05, dt_max=0.5,
                            dtype=jnp.float64, param_dtype=jnp.float64)
        u = jnp.asarray(rng.standard_normal((1, 7, 2)))
        v = layer.init(jax.random.key(2), u)
        y, s = layer.apply(v, u)
        p = jax.tree.map(np.asarray, mnemax_unbox(v)["params"])
        P = 2 if a_init != "real" else 4
        n = np.arange(P)
        A_init = {"lin": -0.5 + 1j * np.pi * n, "inv": -0.5 + 1j * (P / np.pi) * (P / (2 * n + 1) - 1), "real": -(n + 1.0)}[a_init]
        z = np.zeros((7, 2))
        for h in range(2):
            A = -np.exp(p["log_A_real"][h]) + (1j * p["A_imag"][h] if a_init != "real" else 0)
            np.testing.assert_allclose(A, A_init, rtol=1e-12)  # the S4D inits
            C = p["C"][h, :, 0] + 1j * p["C"][h, :, 1] if a_init != "real" else p["C"][h]
            dt = math.exp(p["log_dt"][h])
            x = np.zeros(P, complex)
            for t in range(7):
                x = np.exp(dt * A) * x + (np.exp(dt * A) - 1) / A * float(u[0, t, h])
                out = np.sum(C * x)
                z[t, h] = (2 * out.real if a_init != "real" else out.real) + p["D"][h] * float(u[0, t, h])
            got_state = np.asarray(s.x[0, h])
            want_state = np.concatenate([x.real, x.imag]) if a_init != "real" else x.real
            np.testing.assert_allclose(got_state, want_state, rtol=1e-12, atol=1e-14)
        want = z @ p["output_linear"]["kernel"] + p["output_linear"]["bias"]
        np.testing.assert_allclose(np.asarray(y[0]), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a_init", ["lin", pytest.param("real", marks=pytest.mark.slow)])
def test_diagonal_ssm_conv_view_equals_recurrent_view(a_init):
    """The FFT-convolution view (Vandermonde kernel, final state and incoming state by
    Vandermonde products) equals the linear_scan view, float64: outputs, final state and
    the gradients of every parameter and of u and the state, from a fresh and a given
    state; with resets ``auto`` runs the recurrence."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        kw = dict(features=3, state_size=6, a_init=a_init, dt_min=0.01, dt_max=0.5, dtype=jnp.float64,
                  param_dtype=jnp.float64)
        conv, rec = DiagonalSSM(mode="conv", **kw), DiagonalSSM(mode="recurrent", **kw)
        u = jnp.asarray(rng.standard_normal((2, 37, 3)))
        v = jax.jit(conv.init)(jax.random.key(0), u)
        x0 = DiagonalSSMState(jnp.asarray(rng.standard_normal((2, 3, 6))))
        w = jnp.asarray(rng.standard_normal((2, 37, 3)))

        def loss(layer, v, u, state):
            y, s = layer.apply(v, u, state)
            return jnp.sum(y * w) + jnp.sum(jnp.sin(s.x))

        for state in (None, x0):
            (yc, sc), (yr, sr) = jax.jit(conv.apply)(v, u, state), jax.jit(rec.apply)(v, u, state)
            np.testing.assert_allclose(np.asarray(yc), np.asarray(yr), rtol=1e-9, atol=1e-10)
            np.testing.assert_allclose(np.asarray(sc.x), np.asarray(sr.x), rtol=1e-9, atol=1e-10)
            argnums = (0, 1) if state is None else (0, 1, 2)
            gc = jax.jit(jax.grad(functools.partial(loss, conv), argnums))(v, u, state)
            gr = jax.jit(jax.grad(functools.partial(loss, rec), argnums))(v, u, state)
            for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gr)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-9)
        resets = jnp.zeros((2, 37), bool).at[0, 9].set(True)
        auto = DiagonalSSM(**kw)
        np.testing.assert_allclose(np.asarray(jax.jit(auto.apply)(v, u, x0, resets)[0]),
                                   np.asarray(jax.jit(rec.apply)(v, u, x0, resets)[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [LSSL, DiagonalSSM])
def test_bfloat16_layers_run_the_ssm_in_float32(cls):
    """bf16 activations: the SSM (FFT / scan) runs in float32, states stay float32, and the
    outputs match the float32 layer to bf16 precision."""
    u = jnp.asarray(np.random.default_rng(6).standard_normal((2, 10, 4)), jnp.float32)
    layer = cls(features=4, state_size=6, dt_min=0.01, dt_max=0.5)
    v = jax.jit(layer.init)(jax.random.key(0), u)
    y32, s32 = jax.jit(layer.apply)(v, u)
    y16, s16 = jax.jit(cls(features=4, state_size=6, dt_min=0.01, dt_max=0.5, dtype=jnp.bfloat16).apply)(v, u.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and s16.x.dtype == jnp.float32
    scale = float(jnp.abs(y32).max())
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=3e-2 * scale)
    np.testing.assert_allclose(np.asarray(s16.x), np.asarray(s32.x), atol=3e-2 * float(jnp.abs(s32.x).max()))


# ----------------------------------------------------------------------------- contracts


def test_lssl_contract():
    check_layer_contract(
        lambda **kw: LSSL(features=4, state_size=6, channels=2, dt_min=0.01, dt_max=0.5, **kw), float_input(4)
    )


def test_diagonal_ssm_contract():
    check_layer_contract(lambda **kw: DiagonalSSM(features=4, state_size=6, a_init="lin", dt_min=0.01, dt_max=0.5, **kw), float_input(4))


@pytest.mark.parametrize("name", ["lssl-tiny", "s4d-tiny"])
def test_ssm_lm_streams(name):
    """The zoo models (residual blocks around the layers): two halves with the state carried
    == one call; a reset at step 0 clears the state."""
    model = mnemax.create(name)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 12)), jnp.int32)
    v = jax.jit(model.init)(jax.random.key(0), ids)
    apply = jax.jit(model.apply)
    full, state = apply(v, ids)
    first, mid = apply(v, ids[:, :6])
    second, state2 = apply(v, ids[:, 6:], mid)
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(state2), jax.tree.leaves(state)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    fresh, _ = apply(v, ids[:, 6:])
    cleared, _ = apply(v, ids[:, 6:], mid, jnp.zeros((2, 6), bool).at[:, 0].set(True))
    np.testing.assert_allclose(cleared, fresh, rtol=2e-5, atol=2e-5)


def test_lssl_small_classifier_builds():
    cfg = mnemax.get_config("lssl-small")
    model = mnemax.build(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 1)))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
    d, N, L = cfg.d_model, cfg.block["state_size"], cfg.n_layers
    hidden = int(cfg.block["mlp_ratio"] * d)
    per_layer = (d + d * N + d + d * d + d) + 2 * d + (2 * d * hidden) + 2 * d  # LSSL + norm + MLP (gelu) + norm
    assert count == (1 * d + d) + L * per_layer + 2 * d + (d * 10 + 10)


def test_fft_conv_equals_direct_convolution_with_one_fft_in_flight():
    """causal_fft_conv == the direct causal sum (numpy), and its forward and backward each
    chain their FFTs (every FFT consumes the previous one's result): two FFTs at once could
    deadlock XLA's CPU runtime on 2 cores (an LSSL evaluated at 2x its training length
    hung 2 runs in 3 with a separate rfft of u and of k)."""
    rng = np.random.default_rng(0)
    u, k = rng.standard_normal((3, 37, 4)), rng.standard_normal((4, 2, 37))
    want = np.zeros((3, 37, 4, 2))
    for t in range(37):
        for s in range(t + 1):
            want[:, t] += u[:, s, :, None] * k[None, :, :, t - s]
    got = causal_fft_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)

    def ffts_are_chained(fn, *args):
        with jax.disable_jit():  # inline jnp.fft's own jit, so the FFTs are top-level equations
            eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
        idx = [n for n, e in enumerate(eqns) if e.primitive.name == "fft"]
        for a, b in zip(idx, idx[1:]):  # b depends (transitively) on a's output
            live = set(map(id, eqns[a].outvars))
            for e in eqns[a + 1 : b + 1]:
                if any(id(v) in live for v in e.invars if not hasattr(v, "val")):  # skip literals
                    live |= set(map(id, e.outvars))
            assert any(id(v) in live for v in eqns[b].outvars), f"fft {b} does not wait for fft {a}"
        return len(idx)

    args = (jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32))
    assert ffts_are_chained(causal_fft_conv, *args) == 2
    grad = jax.grad(lambda u, k: jnp.sum(jnp.sin(causal_fft_conv(u, k))), argnums=(0, 1))
    assert ffts_are_chained(grad, *args) == 4
