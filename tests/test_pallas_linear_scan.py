"""Pallas linear_scan kernels (GPU and TPU) in interpret mode equal the reference:
outputs and gradients of every input (the fused backward kernels), with h0, resets,
reverse, lengths that are not a multiple of the chunk, channels that are not a
multiple of 128, and bf16 (the GPU kernel's packed uint32 path). The kernel configuration is
a static argument: a changed config after jit takes effect, a bad one is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import linear_scan
from mnemax.kernels.linear_scan import LinearScanConfig

TOL = {jnp.float32: (6e-4, 2e-3), jnp.bfloat16: (3e-3, 5e-3)}


def _case(shape, dtype, seed):
    # magnitudes below 1 so that a one-ulp bf16 rounding difference stays inside the
    # upstream bf16 tolerance
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.uniform(0.5, 1.0, shape), dtype)
    b = jnp.asarray(0.1 * rng.standard_normal(shape), dtype)
    h0 = jnp.asarray(0.3 * rng.standard_normal((shape[0],) + shape[2:]), jnp.float32)
    resets = jnp.asarray(rng.random(shape[:2]) < 0.1)
    w = jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
    return a, b, h0, resets, w


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize(
    "shape,dtype,reverse",
    [((2, 37, 5), jnp.float32, False), ((1, 70, 3, 50), jnp.float32, True), ((2, 45, 300), jnp.bfloat16, False),
     ((1, 40, 130), jnp.bfloat16, True)],
)
def test_pallas_linear_scan_matches_reference(backend, shape, dtype, reverse):
    a, b, h0, resets, w = _case(shape, dtype, seed=len(shape) + int(reverse))
    rtol, atol = TOL[dtype]

    def run(bk, a, b):
        def f(a, b, h0):
            h = linear_scan(a, b, h0=h0, resets=resets, reverse=reverse, backend=bk, interpret=True)
            return jnp.sum(h.astype(jnp.float32) * w), h

        (_, h), grads = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(a, b, h0)
        return h, grads

    h, grads = run(backend, a, b)
    h_ref, grads_ref = run("reference", a, b)  # same inputs: both round to the same dtype
    assert h.dtype == dtype
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(h_ref, np.float32), rtol=rtol, atol=atol)
    for g, r in zip(grads, grads_ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("field,value,allowed", [("chunk", 0, "a positive integer"), ("stages", 1.5, "a positive integer"),
                                                 ("tpu_chunk", 24, "a multiple of 16"), ("pack_bf16", 1, "True or False")])
def test_a_bad_config_field_is_refused(field, value, allowed):
    with pytest.raises(ValueError, match=rf"LinearScanConfig\.{field}: got {value!r}, expected {allowed}"):
        LinearScanConfig(**{field: value})
    with pytest.raises(TypeError, match="config must be a LinearScanConfig or None, got dict"):
        linear_scan(jnp.ones((1, 3, 2)), jnp.ones((1, 3, 2)), config={"chunk": 16})


@pytest.mark.parametrize("backend,field", [("pallas_gpu", "chunk"), ("pallas_tpu", "tpu_chunk")])
def test_a_changed_config_after_jit_takes_effect(backend, field):
    # The config is a static argument: the same jitted function traces again for another
    # config (a Python side effect counts the traces) and lowers to another program (chunks
    # of 16 steps pad the length 40 to 48, chunks of 32 to 64); both equal the reference, in
    # values and gradients. An equal config reuses the first trace.
    import jax.experimental.pallas.tpu  # noqa: F401 - registers a config option that joins jit's cache key

    a, b, h0, resets, w = _case((2, 40, 5), jnp.float32, seed=4)
    traces = []

    def f(a, b, h0, config, backend=backend):
        traces.append(config)
        h = linear_scan(a, b, h0=h0, resets=resets, backend=backend, interpret=True, config=config)
        return jnp.sum(h * w), h

    jf = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True), static_argnames="config")
    (_, want), want_g = jax.value_and_grad(f, (0, 1, 2), has_aux=True)(a, b, h0, None, "reference")
    short, long = LinearScanConfig(**{field: 16}), LinearScanConfig(**{field: 32})
    traces.clear()
    for config in (short, long, LinearScanConfig(**{field: 16})):
        (_, h), g = jf(a, b, h0, config=config)
        np.testing.assert_allclose(np.asarray(h), np.asarray(want), rtol=1e-6, atol=1e-6)
        for x, y in zip(g, want_g):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert traces == [short, long]  # the third call, an equal config, reused the first trace
    texts = [jf.trace(a, b, h0, config=c).jaxpr.pretty_print() for c in (short, long)]
    assert "f32[2,48,128]" in texts[0] and "f32[2,64,128]" not in texts[0]
    assert "f32[2,64,128]" in texts[1] and "f32[2,48,128]" not in texts[1]
