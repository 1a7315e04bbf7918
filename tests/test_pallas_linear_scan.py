"""Pallas linear_scan kernels (GPU and TPU) in interpret mode equal the reference:
outputs and gradients of every input (the fused backward kernels), with h0, resets,
reverse, lengths that are not a multiple of the chunk, channels that are not a
multiple of 128, and bf16 (the GPU kernel's packed uint32 path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import linear_scan

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
