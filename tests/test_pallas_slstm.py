"""Fused Pallas slstm kernels (TPU and GPU bodies, in interpret mode on CPU) equal the
sequential reference: outputs, final (h, c, n, m) and the gradients of x, R, b and the
incoming state, with resets, a fresh or given incoming state, lengths that are not a
multiple of the time block, odd batch and head sizes, pre-activations up to +-30, and
state carried across calls. float32 relative error <= 1e-4 (outputs, states) and
<= 1e-3 (gradients), the xLSTM issue's tolerances.

The ``gpu``-marked test runs the compiled GPU kernel (Triton):
``JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_pallas_slstm.py``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import available, dispatch, slstm

BACKENDS = ["pallas_tpu", "pallas_gpu"]


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _inputs(seed, batch, time, heads, head_dim, *, with_state, reset_rate, extreme=False, r_scale=0.3):
    rng = np.random.default_rng(seed)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    if extreme:  # pre-activations spread over [-30, 30]
        x = rng.uniform(-30.0, 30.0, (batch, time, 4, heads, head_dim))
    else:
        x = rng.standard_normal((batch, time, 4, heads, head_dim))
    R = r_scale * rng.standard_normal((heads, head_dim, 4, head_dim))
    b = rng.standard_normal((4, heads, head_dim))
    state = None
    if with_state:
        shp = (batch, heads, head_dim)
        state = tuple(map(f32, (rng.standard_normal(shp), rng.standard_normal(shp), 1.0 + rng.random(shp),
                                rng.standard_normal(shp))))
    resets = jnp.asarray(rng.random((batch, time)) < reset_rate) if reset_rate else None
    w_h = f32(rng.standard_normal((batch, time, heads, head_dim)))
    w_s = [f32(rng.standard_normal((batch, heads, head_dim))) for _ in range(4)]
    return (f32(x), f32(R), f32(b)), state, resets, w_h, w_s


def _value_and_grads(backend, args, state, resets, w_h, w_s, interpret=True):
    with_state = state is not None

    def loss(x, R, b, st):
        h, s = slstm(x, R, b, state=st if with_state else None, resets=resets, backend=backend, interpret=interpret)
        return jnp.sum(h * w_h) + sum(jnp.sum(jnp.sin(a) * w) for a, w in zip(s, w_s)), (h, s)

    st = state if with_state else ()
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args, st)
    return out, grads


def _check(backend, case, out_tol=1e-4, grad_tol=1e-3, **kw):
    out, grads = _value_and_grads(backend, *case, **kw)
    with jax.default_matmul_precision("highest"):  # GPU: XLA's default fp32 dot may use TF32 (~1e-3)
        ref_out, ref_grads = _value_and_grads("reference", *case)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves((out, grads)))
    out_err = [rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out))]
    grad_err = [rel_err(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))]
    assert len(grad_err) == (7 if case[1] is not None else 3)
    assert max(out_err) <= out_tol, out_err
    assert max(grad_err) <= grad_tol, grad_err


def test_pallas_slstm_backends_registered_opt_in():
    assert {"pallas_gpu", "pallas_tpu"} <= set(available("slstm"))
    assert dispatch.default_backend("slstm", "gpu") == "xla" and dispatch.default_backend("slstm", "tpu") == "xla"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,with_state,reset_rate,extreme",
    [((2, 21, 2, 8), True, 0.15, False),  # odd length (TPU pads 21 -> 32 steps), state in, resets
     ((3, 18, 1, 5), False, 0.0, False),  # fresh state (m_1 = i~_1), odd batch and head size
     ((2, 19, 2, 8), True, 0.1, True)],  # pre-activations in [-30, 30]
)
def test_pallas_slstm_matches_reference_fp32(backend, shape, with_state, reset_rate, extreme):
    _check(backend, _inputs(sum(shape), *shape, with_state=with_state, reset_rate=reset_rate, extreme=extreme))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_slstm_state_round_trip(backend):
    """Two calls chained through the returned state equal one call (the reference)."""
    (x, R, b), state, resets, _, _ = _inputs(4, 2, 23, 2, 8, with_state=True, reset_rate=0.15)
    run = jax.jit(functools.partial(slstm, backend=backend, interpret=True))
    cut = 9
    h1, s1 = run(x[:, :cut], R, b, state=state, resets=resets[:, :cut])
    h2, s2 = run(x[:, cut:], R, b, state=s1, resets=resets[:, cut:])
    h_ref, s_ref = jax.jit(functools.partial(slstm, backend="reference"))(x, R, b, state=state, resets=resets)
    assert rel_err(jnp.concatenate([h1, h2], axis=1), h_ref) <= 1e-4
    for got, want in zip(s2, s_ref):
        assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("options,shape", [
    ({"splits": 4}, (3, 17, 2, 40)),  # head 40 -> 64 units in 4 programs of 16, one launch
    pytest.param({"splits": 2, "batch_block": 16, "max_programs": 4}, (18, 9, 3, 24), marks=pytest.mark.slow),  # 2 batch blocks, 6 groups, 3 launches
    ({"splits": 2, "spin": "data"}, (2, 11, 1, 32)),
    ({"splits": 2, "prefetch": False}, (3, 13, 2, 32)),  # each step's inputs loaded after the wait
    pytest.param({"splits": 4, "bwd_exchange": "gates"}, (3, 12, 2, 64), marks=pytest.mark.slow),  # backward exchanging the gate gradients
])
def test_pallas_gpu_slstm_split_heads(monkeypatch, options, shape):
    """The GPU kernels with each head's recurrent matrices split over several programs
    (emulated one after the other in interpret mode, through the same exchange buffers and
    flags) equal the reference, and so do launches cut into groups of (head, batch block)."""
    from mnemax.kernels import pallas_slstm_gpu as pg

    for key, value in options.items():
        monkeypatch.setitem(pg.GPU_OPTIONS, key, value)
    plan = pg.Plan(shape[0], shape[2], shape[3], {}, interpret=True)
    assert plan.splits == options["splits"] and plan.groups >= plan.per_launch
    _check("pallas_gpu", _inputs(sum(shape), *shape, with_state=True, reset_rate=0.1))


def test_pallas_gpu_slstm_bad_options(monkeypatch):
    from mnemax.kernels import pallas_slstm_gpu as pg

    with pytest.raises(ValueError, match="splits: got 3"):
        pg.Plan(2, 1, 64, {"splits": 3}, interpret=True)
    with pytest.raises(ValueError, match="splits: got 8"):  # 64 / 8 = 8 units < 16
        pg.Plan(2, 1, 64, {"splits": 8}, interpret=True)
    with pytest.raises(ValueError, match="batch_block: got 24"):
        pg.Plan(2, 1, 64, {"batch_block": 24}, interpret=True)
    with pytest.raises(ValueError, match="precision: got 'fp8'"):
        pg.Plan(2, 1, 64, {"precision": "fp8"}, interpret=True)
    with pytest.raises(ValueError, match="bwd_exchange: got 'rows'"):
        pg.Plan(2, 1, 64, {"bwd_exchange": "rows"}, interpret=True)
    with pytest.raises(ValueError, match="needs spin 'counter' or 'flags'"):
        pg.Plan(2, 1, 64, {"bwd_exchange": "partials", "spin": "data"}, interpret=True)
    with pytest.raises(ValueError, match="max_programs: got 2"):
        pg.Plan(2, 1, 64, {"splits": 4, "max_programs": 2}, interpret=True)
    with pytest.raises(ValueError, match="dr_precision: got 'bf16'"):
        pg.Plan(2, 1, 64, {"dr_precision": "bf16"}, interpret=True)


def test_pallas_gpu_slstm_dr_follows_the_recurrent_precision():
    """dR is an XLA product over batch x time: TF32 (XLA's default) when the recurrent
    products are TF32, float32 when they are TF32x3 or float32, unless set."""
    from mnemax.kernels import pallas_slstm_gpu as pg

    P = jax.lax.Precision
    dr = lambda **o: pg.Plan(2, 1, 64, {"max_programs": 64, **o}, interpret=False).dr_precision  # noqa: E731
    assert (dr(precision="tf32"), dr(precision="tf32x3"), dr(precision="ieee")) == (P.DEFAULT, P.HIGHEST, P.HIGHEST)
    assert (dr(precision="tf32", dr_precision="highest"), dr(precision="tf32x3", dr_precision="tf32")) == (
        P.HIGHEST, P.DEFAULT)
    with jax.default_matmul_precision("highest"):  # as XLA's dots would
        assert dr() == P.HIGHEST


@pytest.mark.gpu
@pytest.mark.parametrize("shape,options", [
    ((4, 200, 4, 64), {}),  # one program per head
    ((4, 200, 4, 64), {"splits": 4}),
    ((4, 200, 4, 64), {"splits": 4, "spin": "flags", "r_resident": False}),
    ((16, 160, 4, 256), {}),  # the benchmark's heads: 16 programs per head exchange h every step
    ((16, 160, 4, 256), {"spin": "data"}),
    ((16, 160, 4, 256), {"bwd_exchange": "gates"}),
    ((16, 160, 4, 256), {"prefetch": False, "bwd_warps": 2}),  # the defaults before prefetching
    ((40, 64, 2, 128), {"max_programs": 8}),  # 2 batch blocks x 2 heads x 4 splits, 2 launches
])
def test_pallas_gpu_slstm_compiled_matches_reference(monkeypatch, shape, options):
    """The compiled GPU kernels (not interpret mode) with TF32x3 recurrent products
    (float32 accuracy). R's entries are 1 / sqrt(head_dim) at head 256: at 0.3 that
    recurrence is chaotic, and the float32 ``xla`` backend and a 1e-7 change of x both
    leave the reference's path after ~56 steps."""
    from mnemax.kernels import pallas_slstm_gpu as pg

    assert jax.default_backend() == "gpu"
    for key, value in {"precision": "tf32x3", **options}.items():
        monkeypatch.setitem(pg.GPU_OPTIONS, key, value)
    r_scale = min(0.3, shape[3] ** -0.5)
    _check("pallas_gpu", _inputs(12, *shape, with_state=True, reset_rate=0.01, r_scale=r_scale), interpret=False)


@pytest.mark.gpu
def test_pallas_gpu_slstm_default_precision_as_accurate_as_xla():
    """At JAX's default matmul precision both GPU backends use TF32 products; the Pallas
    kernels' errors against the float32 reference stay within 2x the xla backend's."""
    assert jax.default_backend() == "gpu"
    case = _inputs(5, 16, 160, 4, 256, with_state=True, reset_rate=0.01, r_scale=256 ** -0.5)
    with jax.default_matmul_precision("highest"):
        ref = jax.tree.leaves(_value_and_grads("reference", *case))
    errs = {}
    for backend in ("xla", "pallas_gpu"):
        got = jax.tree.leaves(_value_and_grads(backend, *case, interpret=False))
        errs[backend] = np.array([rel_err(a, b) for a, b in zip(got, ref)])
    assert np.all(errs["pallas_gpu"] <= np.maximum(2 * errs["xla"], 1e-4)), errs


def test_pallas_slstm_runs_per_shard_under_a_mesh():
    """Under a mesh context the kernel runs per (batch, head) shard (jax.shard_map; a bare
    pallas_call is replicated by the SPMD partitioner) and still equals the reference,
    gradients of R and b (summed over the batch shards) included."""
    from mnemax.sharding import make_mesh

    from .contract import primitives

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    case = _inputs(21, 4, 23, 2, 8, with_state=True, reset_rate=0.1)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda x, R, b: slstm(x, R, b, backend="pallas_gpu", interpret=True))(*case[0])
        assert "shard_map" in primitives(jaxpr.jaxpr)
        _check("pallas_gpu", case)
