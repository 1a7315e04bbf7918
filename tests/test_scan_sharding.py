"""The scan kernels per shard on a mesh whose axes have names of the user's choosing.

On the 8 simulated CPU devices (tests/conftest.py), under ``jax.set_mesh`` of a
``("rows", "cols")`` mesh (JAX's default Explicit axes), ``selective_scan`` and
``linear_scan`` on their Pallas backends (interpret mode) with
``sharding=KernelSharding(batch=("rows",), heads="cols")`` run inside a ``shard_map`` on the
per-shard shapes and equal the unsharded reference in values, final state and every
gradient; the same call with ``sharding=None`` raises instead of running the kernel
replicated. Shapes are tiny: interpret mode is slow."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import linear_scan, selective_scan
from mnemax.kernels.selective_scan import SelectiveScanConfig
from mnemax.kernels.sharding import KernelSharding

TOL = dict(rtol=6e-4, atol=2e-3)
SHARDING = KernelSharding(batch=("rows",), heads="cols")
SS_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0")


def _mesh():
    return jax.make_mesh((4, 2), ("rows", "cols"))


def _shard_maps(fn, *args):
    """The shard_map equations of ``fn``'s jaxpr, outermost first (also inside its vjp)."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "shard_map":
                found.append(e)
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _ss_case():
    rng = np.random.default_rng(5)
    b, t, c, n = 8, 13, 6, 4
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    args = {"x": 0.5 * f(b, t, c), "dt": 0.5 * f(b, t, c) - 1.0, "A": -jnp.asarray(rng.uniform(0.5, 2.0, (c, n)), jnp.float32),
            "B": 0.5 * f(b, t, n), "C": 0.5 * f(b, t, n), "D": f(c), "z": f(b, t, c), "dt_bias": 0.1 * f(c),
            "h0": 0.5 * f(b, c, n)}
    resets = jnp.asarray(rng.random((b, t)) < 0.15)
    return args, resets, 0.3 * f(b, t, c), 0.3 * f(b, c, n)


def _ss_value_and_grad(backend, sharding, config=None):
    args, resets, w, wh = _ss_case()

    def loss(*vals):
        kw = dict(zip(SS_NAMES, vals))
        y, h = selective_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"], dt_bias=kw["dt_bias"],
                              dt_softplus=True, h0=kw["h0"], resets=resets, return_state=True, backend=backend,
                              interpret=True, config=config, sharding=sharding)
        return jnp.sum(y * w) + jnp.sum(h * wh), (y, h)

    fn = jax.value_and_grad(loss, tuple(range(len(SS_NAMES))), has_aux=True)
    return fn, [args[k] for k in SS_NAMES]


# pallas_gpu: the one-lane-per-channel training kernels, whose interpret mode is Pallas' grid
# emulation; Mosaic GPU's interpreter, which runs the lanes kernels, fails under a shard_map
# over 8 CPU devices ("Barrier remains allocated", jax 0.11.2), and the wrapper tested here is
# the same for both layouts.
@pytest.mark.parametrize("backend,config", [("pallas_gpu", SelectiveScanConfig(bwd_layout="channels")), ("pallas_tpu", None)],
                         ids=["pallas_gpu", "pallas_tpu"])
def test_selective_scan_runs_per_shard_on_any_axis_names(backend, config):
    fn, vals = _ss_value_and_grad("reference", None)
    (_, (y_ref, h_ref)), g_ref = jax.jit(fn)(*vals)
    fn, vals = _ss_value_and_grad(backend, SHARDING, config)
    with jax.set_mesh(_mesh()):
        maps = _shard_maps(fn, *vals)
        assert maps, "the kernel call should be wrapped in a shard_map"
        # per shard: 8 rows over 4 devices, 6 channels over 2
        assert maps[0].params["jaxpr"].invars[0].aval.shape == (2, 13, 3)
        (_, (y, h)), g = jax.jit(fn)(*vals)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), **TOL)
    for k, gv, gr in zip(SS_NAMES, g, g_ref):
        np.testing.assert_allclose(np.asarray(gv), np.asarray(gr), **TOL, err_msg=f"gradient of {k}")


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_selective_scan_without_a_sharding_under_a_mesh_raises(backend):
    fn, vals = _ss_value_and_grad(backend, None)
    with jax.set_mesh(_mesh()), pytest.raises(ValueError, match="selective_scan: a Pallas kernel traced under a mesh"):
        jax.jit(fn)(*vals)
    # the XLA backend is partitioned by XLA itself: no sharding needed
    fn, vals = _ss_value_and_grad("xla", None)
    with jax.set_mesh(_mesh()):
        jax.jit(fn)(*vals)


def _ls_case(shape=(8, 37, 6, 3)):
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.uniform(0.5, 1.0, shape), jnp.float32)
    b = jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32)
    h0 = jnp.asarray(0.3 * rng.standard_normal((shape[0],) + shape[2:]), jnp.float32)
    resets = jnp.asarray(rng.random(shape[:2]) < 0.1)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return a, b, h0, resets, w


def _ls_value_and_grad(backend, sharding, reverse):
    a, b, h0, resets, w = _ls_case()

    def loss(a, b, h0):
        h = linear_scan(a, b, h0=h0, resets=resets, reverse=reverse, backend=backend, interpret=True, sharding=sharding)
        return jnp.sum(jnp.tanh(h) * w), h

    return jax.value_and_grad(loss, (0, 1, 2), has_aux=True), (a, b, h0)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward_scan", "reverse_scan"])
def test_linear_scan_runs_per_shard_on_any_axis_names(backend, reverse):
    # the batch over "rows", the first trailing dimension (6) over "cols"
    fn, vals = _ls_value_and_grad("reference", None, reverse)
    (_, h_ref), g_ref = jax.jit(fn)(*vals)
    fn, vals = _ls_value_and_grad(backend, SHARDING, reverse)
    with jax.set_mesh(_mesh()):
        maps = _shard_maps(fn, *vals)
        assert maps and maps[0].params["jaxpr"].invars[0].aval.shape == (2, 37, 3, 3)
        (_, h), g = jax.jit(fn)(*vals)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), **TOL)
    for name, gv, gr in zip(("a", "b", "h0"), g, g_ref):
        np.testing.assert_allclose(np.asarray(gv), np.asarray(gr), **TOL, err_msg=f"gradient of {name}")
    fn, vals = _ls_value_and_grad(backend, None, reverse)
    with jax.set_mesh(_mesh()), pytest.raises(ValueError, match="linear_scan: a Pallas kernel traced under a mesh"):
        jax.jit(fn)(*vals)
