"""mLSTM and sLSTM kernels: the recurrent, parallel and chunkwise mLSTM forms agree with
each other and with a plain numpy loop of the paper's equations; the sLSTM backends equal
a numpy loop; long bf16 sequences with extreme gates stay finite."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import mlstm, slstm
from mnemax.kernels.mlstm import BACKENDS as MLSTM_BACKENDS
from mnemax.kernels.slstm import BACKENDS as SLSTM_BACKENDS

# ----------------------------------------------------------------------------- helpers


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def mlstm_inputs(rng, batch, heads, time, d_qk, d_v, with_state=True, reset_rate=0.1):
    """Gate pre-activations in the range trained models use (input gate ~ N(0, 2^2),
    forget gate ~ N(2, 2^2)), a random incoming state, random resets."""
    q, k = rng.standard_normal((2, batch, heads, time, d_qk))
    v = rng.standard_normal((batch, heads, time, d_v))
    i = 2.0 * rng.standard_normal((batch, heads, time))
    f = 2.0 + 2.0 * rng.standard_normal((batch, heads, time))
    state = None
    if with_state:
        state = (
            rng.standard_normal((batch, heads, d_qk, d_v)),
            rng.standard_normal((batch, heads, d_qk)),
            rng.standard_normal((batch, heads)),
        )
    resets = rng.random((batch, time)) < reset_rate if reset_rate else None
    return q, k, v, i, f, state, resets


def numpy_mlstm(q, k, v, i, f, state=None, resets=None, eps=1e-6):
    """The mLSTM recurrence (paper eqs. with the stabiliser) in float64 Python loops."""
    batch, heads, time, d_qk = q.shape
    d_v = v.shape[-1]
    h = np.zeros((batch, heads, time, d_v))
    C_out = np.zeros((batch, heads, d_qk, d_v))
    n_out = np.zeros((batch, heads, d_qk))
    m_out = np.zeros((batch, heads))
    for b in range(batch):
        for hd in range(heads):
            if state is None:
                C, n, m = np.zeros((d_qk, d_v)), np.zeros(d_qk), 0.0
            else:
                C, n, m = state[0][b, hd].copy(), state[1][b, hd].copy(), float(state[2][b, hd])
            for t in range(time):
                if resets is not None and resets[b, t]:
                    C, n, m = np.zeros((d_qk, d_v)), np.zeros(d_qk), 0.0
                log_f = log_sigmoid(f[b, hd, t])
                m_new = max(log_f + m, i[b, hd, t])
                f_act, i_act = np.exp(log_f + m - m_new), np.exp(i[b, hd, t] - m_new)
                C = f_act * C + i_act * np.outer(k[b, hd, t], v[b, hd, t])
                n = f_act * n + i_act * k[b, hd, t]
                m = m_new
                qs = q[b, hd, t] / np.sqrt(d_qk)
                h[b, hd, t] = qs @ C / (max(abs(qs @ n), np.exp(-m)) + eps)
            C_out[b, hd], n_out[b, hd], m_out[b, hd] = C, n, m
    return h, (C_out, n_out, m_out)


FORMS = [("reference", 64), ("parallel", 64), ("xla", 16), ("xla", 64), ("xla", 128)]


# ----------------------------------------------------------------------------- mLSTM


def test_mlstm_reference_matches_numpy_loop():
    rng = np.random.default_rng(0)
    q, k, v, i, f, state, resets = mlstm_inputs(rng, 2, 2, 9, 3, 4)
    want_h, want_s = numpy_mlstm(q, k, v, i, f, state, resets)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    h, s = jax.jit(functools.partial(mlstm, backend="reference"))(
        f32(q), f32(k), f32(v), f32(i), f32(f), state=tuple(map(f32, state)), resets=resets
    )
    assert rel_err(h, want_h) < 1e-5
    for got, want in zip(s, want_s):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("time", [37, pytest.param(301, marks=pytest.mark.slow)])  # 301 under -m slow (CI time)
def test_mlstm_forms_agree_fp32(time):
    """reference == parallel == chunkwise (chunk 16/64/128, padded odd lengths), with an
    incoming state, with resets (37 steps) and without (301 steps): outputs, final state
    and gradients of every input."""
    rng = np.random.default_rng(time)
    q, k, v, i, f, state, resets = mlstm_inputs(rng, 2, 2, time, 4, 5, reset_rate=0.1 if time < 100 else 0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    args = tuple(map(f32, (q, k, v, i, f))) + (tuple(map(f32, state)),)
    w_h = f32(rng.standard_normal(v.shape))
    w_s = [f32(rng.standard_normal(np.shape(s))) for s in state]

    forms = FORMS if time > 128 else FORMS[:4]  # chunks of 64 and 128 are both one chunk here

    @jax.jit
    def run(args):
        outs = []
        for backend, chunk in forms:

            def loss(*a):
                h, s = mlstm(*a[:5], state=a[5], resets=resets, backend=backend, chunk_size=chunk)
                return jnp.sum(h * w_h) + sum(jnp.sum(jnp.sin(x) * w) for x, w in zip(s, w_s)), (h, s)

            (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)(*args)
            outs.append((out, grads))
        return outs

    (ref_out, ref_grads), *others = run(args)
    for (backend, chunk), (out, grads) in zip(forms[1:], others):
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
            assert rel_err(got, want) <= 1e-4, (backend, chunk)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert rel_err(got, want) <= 1e-3, (backend, chunk, "grad")


def test_parallel_form_at_several_heads_and_a_long_sequence():
    """4 heads x 1024 steps at d_qk 256 / d_v 512 (jitted, float32): the quadratic form
    equals the chunkwise one and each head run alone. XLA:CPU (jax 0.11.2) miscompiled the
    normalisation fused onto its einsums here (outputs ~1e30) until num was kept whole."""
    rng = np.random.default_rng(2)
    f32 = lambda *s, off=0.0: jnp.asarray(rng.standard_normal(s) + off, jnp.float32)  # noqa: E731
    q, k, v, i, f = f32(1, 4, 1024, 256), f32(1, 4, 1024, 256), f32(1, 4, 1024, 512), f32(1, 4, 1024), f32(1, 4, 1024, off=3.0)
    run = jax.jit(lambda *a, backend: mlstm(*a, backend=backend)[0], static_argnames="backend")
    with jax.default_matmul_precision("highest"):
        par, chunked = run(q, k, v, i, f, backend="parallel"), run(q, k, v, i, f, backend="xla")
        head = run(*(a[:, 1:2] for a in (q, k, v, i, f)), backend="parallel")
    assert float(jnp.max(jnp.abs(par))) < 1e3
    assert rel_err(par, chunked) <= 1e-4
    assert rel_err(par[:, 1:2], head) <= 1e-5


def test_chunkwise_bf16_gradients_are_as_accurate_as_its_outputs():
    """bf16 q, k, v, gates, 2048 steps: the chunkwise (xla) form's gradients of every input
    are within 1e-2 of the float32 gradients on the same rounded inputs (about 3e-3, the
    outputs' own bf16 error). Differentiating through its bf16 casts rounded each
    cotangent to bf16 before a value's several cotangents were summed: 6-7% off in q, k
    and the gates."""
    rng = np.random.default_rng(2)
    bf = lambda *s, off=0.0: jnp.asarray(rng.standard_normal(s) + off, jnp.bfloat16)  # noqa: E731
    args = (bf(1, 1, 2048, 64), bf(1, 1, 2048, 64), bf(1, 1, 2048, 64), bf(1, 1, 2048), bf(1, 1, 2048, off=3.0))
    dh = jnp.asarray(rng.standard_normal((1, 1, 2048, 64)), jnp.float32)

    def grads(backend, xs):
        loss = lambda *a: jnp.sum(mlstm(*a, backend=backend)[0].astype(jnp.float32) * dh)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*xs)

    with jax.default_matmul_precision("highest"):
        want = grads("parallel", tuple(a.astype(jnp.float32) for a in args))
    got = grads("xla", args)
    errs = [rel_err(g.astype(jnp.float32), w) for g, w in zip(got, want)]
    assert max(errs) <= 1e-2, errs


def test_mlstm_forms_are_algebraically_equal_float64():
    """In float64 the three forms agree to rounding (1e-12), gates as extreme as +-12."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        q, k, v, i, f, state, resets = mlstm_inputs(rng, 1, 2, 45, 3, 2)
        i, f = 6 * i, 6 * f

        @jax.jit
        def run(q, k, v, i, f, state):
            return [
                mlstm(q, k, v, i, f, state=state, resets=resets, backend=b, chunk_size=c)
                for b, c in [("reference", 1), ("parallel", 1), ("xla", 8), ("xla", 64)]
            ]

        ref, *others = run(q, k, v, i, f, state)
        for out in others:
            for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
                assert rel_err(got, want) < 1e-12


def test_mlstm_resets_equal_separate_sequences_and_padding_keeps_state():
    """A reset == a fresh call from that step (outputs and state); a padded last chunk
    leaves the final state of the unpadded sequence."""
    rng = np.random.default_rng(2)
    q, k, v, i, f, state, _ = mlstm_inputs(rng, 1, 2, 23, 4, 3)
    cut = 9
    resets = np.zeros((1, 23), bool)
    resets[0, cut] = True
    run = jax.jit(functools.partial(mlstm, backend="xla", chunk_size=8))
    h, s = run(q, k, v, i, f, state=state, resets=resets)
    h_b, s_b = run(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], i[:, :, cut:], f[:, :, cut:])
    assert rel_err(h[:, :, cut:], h_b) < 1e-5
    for got, want in zip(s, s_b):
        assert rel_err(got, want) < 1e-5
    # 23 steps in chunks of 8 pads 1 step; the state equals 3 exact chunks' worth of the reference.
    _, s_ref = jax.jit(functools.partial(mlstm, backend="reference"))(q, k, v, i, f, state=state, resets=resets)
    for got, want in zip(s, s_ref):
        assert rel_err(got, want) < 1e-5


def test_mlstm_16k_steps_bf16_extreme_gates_stay_finite():
    """Gate pre-activations up to +-30 over 16,384 steps in bfloat16: outputs, states and
    gradients finite for the chunkwise and recurrent forms, which agree to bf16 precision."""
    rng = np.random.default_rng(3)
    time = 16384
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    q, k, v = (bf(rng.standard_normal((1, 1, time, 4))) for _ in range(3))
    i, f = (bf(rng.uniform(-30, 30, (1, 1, time))) for _ in range(2))

    @jax.jit
    def run(q, k, v, i, f):
        outs = []
        for backend in ("xla", "reference"):
            def loss(q, k, v, i, f):
                h, s = mlstm(q, k, v, i, f, backend=backend)
                return jnp.sum(h.astype(jnp.float32)), (h, s)

            (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, i, f)
            outs.append((out, grads))
        return outs

    (out_x, g_x), (out_r, _) = run(q, k, v, i, f)
    assert out_x[0].dtype == jnp.bfloat16 and out_x[1].C.dtype == jnp.float32
    for leaf in jax.tree.leaves((out_x, g_x, out_r)):
        assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
    assert rel_err(out_x[0], out_r[0]) < 2e-2
    assert rel_err(out_x[1].m, out_r[1].m) < 1e-5


def test_mlstm_bad_inputs_name_the_argument():
    q = jnp.ones((1, 2, 5, 3))
    g = jnp.ones((1, 2, 5))
    with pytest.raises(ValueError, match="^q must"):
        mlstm(q[0], q[0], q[0], g, g)
    with pytest.raises(ValueError, match="^k must"):
        mlstm(q, q[..., :2], q, g, g)
    with pytest.raises(ValueError, match="^v must"):
        mlstm(q, q, q[:, :1], g, g)
    with pytest.raises(ValueError, match="^f must"):
        mlstm(q, q, q, g, g[..., :4])
    with pytest.raises(ValueError, match="^state must"):
        mlstm(q, q, q, g, g, state=(jnp.ones((1, 2, 3, 3)), jnp.ones((1, 2, 3)), jnp.ones((1, 3))))
    with pytest.raises(ValueError, match="^resets must"):
        mlstm(q, q, q, g, g, resets=jnp.zeros((1, 4), bool))
    with pytest.raises(ValueError, match="^chunk_size must"):
        mlstm(q, q, q, g, g, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        mlstm(q, q, q, g, g, backend="cuda")
    assert {"reference", "xla"} <= set(MLSTM_BACKENDS.available())


# ----------------------------------------------------------------------------- sLSTM


def numpy_slstm(x, R, b, state=None, resets=None):
    """sLSTM from the paper's equations (exponential gating, stabiliser, normaliser,
    block-diagonal recurrence), float64 Python loops. x: (B, T, 4, H, D)."""
    batch, time, _, heads, dh = x.shape
    out = np.zeros((batch, time, heads, dh))
    finals = []
    for bb in range(batch):
        if state is None:
            h, c, n, m = (np.zeros((heads, dh)) for _ in range(4))
        else:
            h, c, n, m = (np.array(s[bb], np.float64) for s in state)
        started = state is not None and bool(np.any(n != 0))
        for t in range(time):
            if resets is not None and resets[bb, t]:
                h, c, n, m = (np.zeros((heads, dh)) for _ in range(4))
                started = False
            pre = x[bb, t] + b + np.stack([np.stack([h[hd] @ R[hd, :, g, :] for hd in range(heads)]) for g in range(4)])
            i_t, f_t, z_t, o_t = pre
            log_f = log_sigmoid(f_t)
            m_new = np.maximum(log_f + m, i_t) if started else i_t
            i_act = np.exp(i_t - m_new)
            f_act = np.exp(log_f + m - m_new) if started else np.zeros_like(i_t)
            c = f_act * c + i_act * np.tanh(z_t)
            n = f_act * n + i_act
            m = m_new
            h = 1 / (1 + np.exp(-o_t)) * c / n
            started = True
            out[bb, t] = h
        finals.append((h, c, n, m))
    return out, tuple(np.stack([f[j] for f in finals]) for j in range(4))


@pytest.mark.parametrize("with_state", [False, True])
def test_slstm_backends_match_python_loop(with_state):
    rng = np.random.default_rng(4)
    batch, time, heads, dh = 2, 13, 2, 3
    x = (2 * rng.standard_normal((batch, time, 4, heads, dh))).astype(np.float32)
    R = (0.5 * rng.standard_normal((heads, dh, 4, dh))).astype(np.float32)
    b = rng.standard_normal((4, heads, dh)).astype(np.float32)
    resets = rng.random((batch, time)) < 0.15
    state = None
    if with_state:
        st = rng.standard_normal((4, batch, heads, dh)).astype(np.float32)
        st[2] = np.abs(st[2]) + 1.0  # a normaliser of a running memory is >= 1
        state = tuple(st)
    want_h, want_s = numpy_slstm(x, R, b, state, resets)

    @jax.jit
    def run(x, R, b, state):
        return [slstm(x, R, b, state=state, resets=resets, backend=be) for be in ("reference", "xla")]

    for h, s in run(x, R, b, state):
        assert rel_err(h, want_h) < 1e-5
        for got, want in zip(s, want_s):
            assert rel_err(got, want) < 1e-5


def test_slstm_xla_gradients_match_reference():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 11, 4, 2, 3)).astype(np.float32)
    R = (0.5 * rng.standard_normal((2, 3, 4, 3))).astype(np.float32)
    b = rng.standard_normal((4, 2, 3)).astype(np.float32)
    state = tuple(np.abs(rng.standard_normal((4, 2, 2, 3))).astype(np.float32) + 0.5)
    resets = rng.random((2, 11)) < 0.2
    w = rng.standard_normal((2, 11, 2, 3)).astype(np.float32)

    @jax.jit
    def grads(x, R, b, state):
        def loss(backend):
            def f(x, R, b, state):
                h, s = slstm(x, R, b, state=state, resets=resets, backend=backend)
                return jnp.sum(h * w) + sum(jnp.sum(jnp.sin(leaf)) for leaf in s)

            return f

        return [jax.grad(loss(be), argnums=(0, 1, 2, 3))(x, R, b, state) for be in ("reference", "xla")]

    ref, got = grads(x, R, b, state)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert rel_err(g, r) < 1e-5


def test_slstm_bad_inputs_name_the_argument():
    x = jnp.ones((1, 3, 4, 2, 2))
    R = jnp.ones((2, 2, 4, 2))
    with pytest.raises(ValueError, match="^x must"):
        slstm(x[:, :, :3], R)
    with pytest.raises(ValueError, match="^R must"):
        slstm(x, R[:1])
    with pytest.raises(ValueError, match="^b must"):
        slstm(x, R, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="^state must"):
        slstm(x, R, state=tuple(jnp.ones((2, 2, 2)) for _ in range(4)))
    with pytest.raises(ValueError, match="^resets must"):
        slstm(x, R, resets=jnp.ones((1, 2), bool))
    assert {"reference", "xla"} <= set(SLSTM_BACKENDS.available())


def _stack_temp_bytes(n_layers: int, remat: bool) -> int:
    """Compiled temporaries of the gradient of ``n_layers`` mLSTM layers (xla backend)."""
    B, H, T, D = 1, 2, 1024, 128

    def layer(x, w):
        q = (x @ w).astype(jnp.bfloat16).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        g = jnp.sum(q.astype(jnp.float32), -1) * 0.01
        h, _ = mlstm(q, q, q, g, g, backend="xla", chunk_size=16)
        return x + h.transpose(0, 2, 1, 3).reshape(B, T, H * D).astype(jnp.float32)

    def loss(x, ws):
        for w in ws:
            x = (jax.checkpoint(layer) if remat else layer)(x, w)
        return jnp.sum(x)

    x = jax.ShapeDtypeStruct((B, T, H * D), jnp.float32)
    ws = [jax.ShapeDtypeStruct((H * D, H * D), jnp.float32)] * n_layers
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # ~35 s on 2 cores (CI time)
def test_remat_bounds_the_memory_of_a_deep_mlstm_stack():
    # Under jax.checkpoint each layer's chunk states (64 chunks x (128 x 128) per head) must
    # be rebuilt in the backward one layer at a time; with a lax.scan carry XLA kept all of
    # them alive (temporaries grew ~linearly with depth, as they do without remat).
    no_remat = [_stack_temp_bytes(n, remat=False) for n in (1, 4)]
    remat = [_stack_temp_bytes(n, remat=True) for n in (1, 4)]
    assert no_remat[1] > 2.0 * no_remat[0], no_remat  # the measure sees per-layer residuals
    assert remat[1] < 1.3 * remat[0], remat


def test_stabiliser_max_value_and_gradient():
    """The mLSTM stabiliser's max (kernels.mlstm.common.stabiliser_max): the value of jnp.max,
    -inf entries included, and a gradient equal to central differences (float64): the whole
    cotangent at the row's arg-max, zero elsewhere, never 0/0."""
    from mnemax.kernels.mlstm.common import stabiliser_max

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 7))
    x[0, 1, :4] = -np.inf  # masked entries, as the stabiliser's inputs have
    with jax.enable_x64(True):
        xj = jnp.asarray(x)
        np.testing.assert_array_equal(np.asarray(stabiliser_max(xj)), x.max(-1))
        w = jnp.asarray(rng.standard_normal((3, 5)))
        g = np.asarray(jax.jit(jax.grad(lambda a: jnp.sum(w * stabiliser_max(a))))(xj))
        want = np.zeros_like(x)
        idx = x.argmax(-1)
        for a in range(3):
            for b in range(5):
                want[a, b, idx[a, b]] = float(w[a, b])
        np.testing.assert_array_equal(g, want)
        d = np.where(np.isfinite(x), rng.standard_normal(x.shape), 0.0)
        f = lambda a: float(jnp.sum(w * stabiliser_max(jnp.asarray(a))))  # noqa: E731
        numeric = (f(x + 1e-6 * d) - f(x - 1e-6 * d)) / 2e-6
        assert abs(numeric - float(np.sum(g * d))) < 1e-8 * max(1.0, abs(numeric))
