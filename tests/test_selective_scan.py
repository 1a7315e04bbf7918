"""selective_scan: both backends equal a plain Python loop; xla equals reference in values,
final state and gradients wrt every input at the upstream tolerances (fp32 rtol 6e-4 /
atol 2e-3), with resets, h0 and odd lengths; the xla backend's memory grows with the
sequence like the output, not like (batch, time, channels, state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import selective_scan
from mnemax.kernels.selective_scan import BACKENDS

RTOL, ATOL = 6e-4, 2e-3  # mamba_ssm's fp32 tolerances for selective_scan_fn vs selective_scan_ref


def loop_selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, h0=None, resets=None):
    """The S6 recurrence written with Python loops over numpy float64 arrays."""
    x, dt, A, B, C = (np.asarray(v, np.float64) for v in (x, dt, A, B, C))
    batch, time, channels = x.shape
    state = A.shape[1]
    y = np.zeros((batch, time, channels))
    h_last = np.zeros((batch, channels, state))
    for b in range(batch):
        h = np.zeros((channels, state)) if h0 is None else np.array(h0[b], np.float64)
        for t in range(time):
            if resets is not None and resets[b, t]:
                h = np.zeros_like(h)
            for d in range(channels):
                step = dt[b, t, d] + (0.0 if dt_bias is None else float(dt_bias[d]))
                if dt_softplus:
                    step = np.log1p(np.exp(step))
                for n in range(state):
                    h[d, n] = np.exp(step * A[d, n]) * h[d, n] + step * B[b, t, n] * x[b, t, d]
                out = float(np.dot(C[b, t], h[d]))
                if D is not None:
                    out += float(D[d]) * x[b, t, d]
                if z is not None:
                    zz = float(z[b, t, d])
                    out *= zz / (1.0 + np.exp(-zz))
                y[b, t, d] = out
        h_last[b] = h
    return y, h_last


def make_inputs(seed, batch, time, channels, state, full=True, dtype=jnp.float32):
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    args = dict(
        x=arr(batch, time, channels),
        dt=arr(batch, time, channels, scale=0.5),
        A=jnp.asarray(-rng.uniform(0.2, 2.0, (channels, state)), dtype),
        B=arr(batch, time, state),
        C=arr(batch, time, state),
    )
    if full:
        args.update(
            D=arr(channels),
            z=arr(batch, time, channels),
            dt_bias=arr(channels, scale=0.5),
            h0=arr(batch, channels, state),
        )
    resets = jnp.asarray(rng.random((batch, time)) < 0.15).at[0, 0].set(True)
    return args, resets


CASES = [
    # (batch, time, channels, state, chunk_size, full, with_resets)
    (2, 1, 3, 2, None, True, True),
    (2, 13, 5, 3, 4, True, True),  # odd length: 4 chunks, the last one padded
    (1, 17, 4, 5, 8, True, False),
    (3, 9, 2, 4, None, False, True),
    (2, 16, 3, 2, 16, False, False),
]


@pytest.mark.parametrize("case", CASES)
def test_backends_match_python_loop(case):
    batch, time, channels, state, chunk, full, with_resets = case
    args, resets = make_inputs(CASES.index(case), batch, time, channels, state, full)
    if not with_resets:
        resets = None
    np_args = {k: np.asarray(v) for k, v in args.items()}
    want_y, want_h = loop_selective_scan(**np_args, dt_softplus=full, resets=None if resets is None else np.asarray(resets))
    for backend in ("reference", "xla"):
        fn = jax.jit(lambda a, r: selective_scan(**a, dt_softplus=full, resets=r, return_state=True, chunk_size=chunk, backend=backend))
        y, h = fn(args, resets)
        assert y.shape == (batch, time, channels) and y.dtype == jnp.float32
        assert h.shape == (batch, channels, state) and h.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5, err_msg=backend)
        np.testing.assert_allclose(np.asarray(h), want_h, rtol=1e-5, atol=1e-5, err_msg=backend)


@pytest.mark.parametrize("time,chunk,with_resets", [(13, 4, True), (10, 3, False)])
def test_xla_matches_reference_values_state_and_gradients(time, chunk, with_resets):
    """Gradients wrt x, dt, A, B, C, D, z, dt_bias and h0 through a loss on y and the final state."""
    args, resets = make_inputs(time, 2, time, 6, 4)
    if not with_resets:
        resets = None
    rng = np.random.default_rng(1)
    w_y = jnp.asarray(rng.standard_normal((2, time, 6)), jnp.float32)
    w_h = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)

    def loss(backend):
        def f(a):
            y, h = selective_scan(**a, dt_softplus=True, resets=resets, return_state=True, chunk_size=chunk, backend=backend)
            return jnp.sum(y * w_y) + jnp.sum(jnp.sin(h) * w_h), (y, h)

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (_, (y_ref, h_ref)), g_ref = loss("reference")(args)
    (_, (y_xla, h_xla)), g_xla = loss("xla")(args)
    np.testing.assert_allclose(np.asarray(y_xla), np.asarray(y_ref), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(h_xla), np.asarray(h_ref), rtol=RTOL, atol=ATOL)
    assert set(g_ref) == {"x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0"}
    for name in g_ref:
        assert float(jnp.abs(g_ref[name]).max()) > 0, name
        np.testing.assert_allclose(np.asarray(g_xla[name]), np.asarray(g_ref[name]), rtol=RTOL, atol=ATOL, err_msg=name)
    if not with_resets:
        return
    # and the gradient is right: a central difference along a random direction (float64)
    with jax.enable_x64(True):
        a64 = {k: v.astype(jnp.float64) for k, v in args.items()}
        w64 = (w_y.astype(jnp.float64), w_h.astype(jnp.float64))

        def f64(a):
            y, h = selective_scan(**a, dt_softplus=True, resets=resets, return_state=True, chunk_size=chunk, backend="xla")
            return jnp.sum(y * w64[0]) + jnp.sum(jnp.sin(h) * w64[1])

        direction = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float64) for k, v in a64.items()}
        g = jax.jit(jax.grad(f64))(a64)
        analytic = sum(float(jnp.sum(g[k] * direction[k])) for k in g)
        eps = 1e-6
        shift = lambda s: {k: a64[k] + s * direction[k] for k in a64}  # noqa: E731
        numeric = (float(jax.jit(f64)(shift(eps))) - float(jax.jit(f64)(shift(-eps)))) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-6 * abs(numeric), (analytic, numeric)


def test_bf16_inputs_compute_in_float32():
    args, resets = make_inputs(3, 2, 11, 4, 3)
    bf = {k: v.astype(jnp.bfloat16) for k, v in args.items()}
    y, h = jax.jit(lambda a: selective_scan(**a, dt_softplus=True, resets=resets, return_state=True, chunk_size=4, backend="xla"))(bf)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    # the same numbers as float32 arithmetic on the bf16-rounded inputs, up to the final rounding
    up = {k: v.astype(jnp.float32) for k, v in bf.items()}
    y32, h32 = selective_scan(**up, dt_softplus=True, resets=resets, return_state=True, backend="reference")
    np.testing.assert_allclose(np.asarray(h), np.asarray(h32), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32.astype(jnp.bfloat16), np.float32), rtol=1e-2, atol=1e-2)


def test_xla_memory_grows_like_the_output():
    """Compiled temp memory of value-and-grad: from T to 2T, the xla backend grows by far
    less than one (batch, T, channels, state) array; the reference grows by more."""
    batch, channels, state, chunk = 1, 32, 64, 16
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731

    def temp_bytes(backend, time):
        def loss(x, dt, A, B, C):
            return jnp.sum(selective_scan(x, dt, A, B, C, dt_softplus=True, chunk_size=chunk, backend=backend) ** 2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        shapes = (f32(batch, time, channels), f32(batch, time, channels), f32(channels, state), f32(batch, time, state), f32(batch, time, state))
        return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    t1, t2 = 256, 512
    one_full = batch * (t2 - t1) * channels * state * 4  # one (batch, T, channels, state) float32 array
    grow_xla = temp_bytes("xla", t2) - temp_bytes("xla", t1)
    grow_ref = temp_bytes("reference", t2) - temp_bytes("reference", t1)
    assert grow_ref >= one_full, (grow_ref, one_full)
    assert grow_xla < 0.25 * one_full, (grow_xla, one_full)


def test_bad_inputs_raise():
    args, _ = make_inputs(0, 2, 5, 3, 2)
    with pytest.raises(ValueError, match="x must"):
        selective_scan(args["x"][0], args["dt"], args["A"], args["B"], args["C"])
    with pytest.raises(ValueError, match="A must"):
        selective_scan(args["x"], args["dt"], args["A"][:2], args["B"], args["C"])
    with pytest.raises(ValueError, match="B must"):
        selective_scan(args["x"], args["dt"], args["A"], args["B"][:, :3], args["C"])
    with pytest.raises(ValueError, match="h0 must"):
        selective_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], h0=args["h0"][:1])
    with pytest.raises(ValueError, match="resets must"):
        selective_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], resets=jnp.zeros((2, 4), bool))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        selective_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], backend="nope")
    assert BACKENDS.available() == ("reference", "xla", "pallas_gpu", "pallas_tpu")
