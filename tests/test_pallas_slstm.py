"""Fused Pallas slstm kernels (TPU and GPU bodies, in interpret mode on CPU) equal the
sequential reference: outputs, final (h, c, n, m) and the gradients of x, R, b and the
incoming state, with resets, a fresh or given incoming state, lengths that are not a
multiple of the time block, odd batch and head sizes, pre-activations up to +-30, and
state carried across calls. float32 relative error <= 1e-4 (outputs, states) and
<= 1e-3 (gradients), the xLSTM issue's tolerances.

The ``gpu``-marked test runs the compiled GPU kernel (Triton):
``JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_pallas_slstm.py``.

Also here: a kernel configuration (``SLSTMConfig``) changed after ``jax.jit`` takes effect
(a new trace, other kernel launches, the same numbers), and one-step calls (generation)
equal the multi-step call's step for every backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import SLSTMConfig, slstm
from mnemax.kernels.slstm import BACKENDS as SLSTM_BACKENDS
from mnemax.kernels.slstm import gpu as slstm_gpu

from .contract import primitives

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


def _value_and_grads(backend, args, state, resets, w_h, w_s, interpret=True, **kw):
    """(h, final state) and the gradients of a loss that reads every output; ``kw``: the
    op's ``config`` / ``sharding``."""
    with_state = state is not None

    def loss(x, R, b, st):
        h, s = slstm(x, R, b, state=st if with_state else None, resets=resets, backend=backend, interpret=interpret,
                     **kw)
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
    assert {"pallas_gpu", "pallas_tpu"} <= set(SLSTM_BACKENDS.available())
    assert SLSTM_BACKENDS.default("gpu") == "xla" and SLSTM_BACKENDS.default("tpu") == "xla"


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


@pytest.mark.parametrize("fields,shape", [
    ({"splits": 4}, (3, 17, 2, 40)),  # head 40 -> 64 units in 4 programs of 16, one launch
    pytest.param({"splits": 2, "batch_block": 16, "max_programs": 4}, (18, 9, 3, 24), marks=pytest.mark.slow),  # 2 batch blocks, 6 groups, 3 launches
    ({"splits": 2}, (3, 13, 2, 32)),
])
def test_pallas_gpu_slstm_split_heads(fields, shape):
    """The GPU kernels with each head's recurrent matrices split over several programs
    (emulated one after the other in interpret mode, through the same exchange buffers and
    counters) equal the reference, and so do launches cut into groups of (head, batch block)."""
    config = SLSTMConfig(**fields)
    plan = slstm_gpu.Plan(shape[0], shape[2], shape[3], config, interpret=True)
    assert plan.splits == fields["splits"] and plan.groups >= plan.per_launch
    _check("pallas_gpu", _inputs(sum(shape), *shape, with_state=True, reset_rate=0.1), config=config)


def test_pallas_gpu_slstm_bad_config():
    Plan = slstm_gpu.Plan
    with pytest.raises(ValueError, match="SLSTMConfig.splits: got 3; expected None or a power of two"):
        SLSTMConfig(splits=3)
    with pytest.raises(ValueError, match="SLSTMConfig.splits: got 8; expected a power of two leaving >= 16 units"):
        Plan(2, 1, 64, SLSTMConfig(splits=8), interpret=True)  # 64 / 8 = 8 units < 16
    with pytest.raises(ValueError, match="SLSTMConfig.batch_block: got 24; expected None or a power of two >= 16"):
        SLSTMConfig(batch_block=24)
    with pytest.raises(ValueError, match="SLSTMConfig.precision: got 'fp8'"):
        SLSTMConfig(precision="fp8")
    with pytest.raises(ValueError, match="SLSTMConfig.bwd_warps: got 3; expected a power of two from 1 to 32"):
        SLSTMConfig(bwd_warps=3)
    with pytest.raises(ValueError, match="SLSTMConfig.max_programs: got 0"):
        SLSTMConfig(max_programs=0)
    with pytest.raises(ValueError, match=r"SLSTMConfig.max_programs: got 2; expected >= splits \(4\)"):
        Plan(2, 1, 64, SLSTMConfig(splits=4, max_programs=2), interpret=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'spin'"):  # a removed variant
        SLSTMConfig(spin="data")
    x = jnp.ones((1, 3, 4, 1, 16))
    with pytest.raises(TypeError, match="config must be an SLSTMConfig or None, got dict"):
        slstm(x, jnp.zeros((1, 16, 4, 16)), backend="pallas_gpu", interpret=True, config={"splits": 1})


def test_pallas_gpu_slstm_dr_follows_the_recurrent_precision():
    """dR is an XLA product over batch x time: TF32 (XLA's default) when the recurrent
    products are TF32, float32 when they are TF32x3 or float32."""
    P = jax.lax.Precision
    dr = lambda **o: slstm_gpu.Plan(2, 1, 64, SLSTMConfig(max_programs=64, **o), interpret=False).dr_precision  # noqa: E731
    assert (dr(precision="tf32"), dr(precision="tf32x3"), dr(precision="ieee")) == (P.DEFAULT, P.HIGHEST, P.HIGHEST)
    assert dr() == P.DEFAULT  # JAX's default matmul precision: TF32
    with jax.default_matmul_precision("highest"):  # as XLA's dots would
        assert dr() == P.HIGHEST


def test_pallas_gpu_slstm_config_change_after_jit_takes_effect():
    """One jitted function, the config a static argument: a config that cuts the launches
    (one program per launch: 2 groups, 2 launches each way) makes a trace of its own with
    twice the kernel launches, and each run equals the reference."""
    traces = []

    @functools.partial(jax.jit, static_argnums=1)
    def grads(args, config):
        traces.append(config)
        loss = lambda *a: jnp.sum(slstm(*a, backend="pallas_gpu", interpret=True, config=config)[0])  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(*args)

    (x, R, b), _, _, _, _ = _inputs(6, 2, 7, 2, 16, with_state=False, reset_rate=0.0)
    default, cut = SLSTMConfig(), SLSTMConfig(max_programs=1)
    with jax.default_matmul_precision("highest"):
        want = jax.grad(lambda *a: jnp.sum(slstm(*a, backend="reference")[0]), argnums=(0, 1, 2))(x, R, b)
    for config in (default, cut):
        got = grads((x, R, b), config)
        assert max(rel_err(g, w) for g, w in zip(got, want)) <= 1e-3
    assert set(traces) == {default, cut}  # the second config made a trace of its own
    count = {c: str(grads.trace((x, R, b), c).jaxpr).count("pallas_call[") for c in (default, cut)}
    assert (count[default], count[cut]) == (2, 4), count


# ----------------------------------------------------------------------------- one step (generation)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas_gpu", "pallas_tpu"])
def test_one_step_equals_the_multi_step_call(backend):
    """Prefix of 6 steps, then one step (time == 1, the closed form), from a nonzero state,
    with a reset on that step in one row: outputs, final state and the gradients of x, R, b
    and the incoming state equal one reference call over the 7 steps. The one-step call
    launches no kernel and runs no loop."""
    (x, R, b), state, _, w_h, w_s = _inputs(31, 2, 7, 2, 8, with_state=True, reset_rate=0.0)
    resets = jnp.asarray(np.array([[False, True, False, False, False, False, True],
                                   [False, False, False, True, False, False, False]]))
    run = functools.partial(slstm, backend=backend, interpret=True)

    def split(x, R, b, st):
        h1, s1 = run(x[:, :6], R, b, state=st, resets=resets[:, :6])
        h2, s2 = run(x[:, 6:], R, b, state=s1, resets=resets[:, 6:])
        return jnp.concatenate([h1, h2], axis=1), s2

    def whole(x, R, b, st):
        return slstm(x, R, b, state=st, resets=resets, backend="reference")

    def value_and_grads(fn):
        def loss(*a):
            h, s = fn(*a)
            return jnp.sum(h * w_h) + sum(jnp.sum(jnp.sin(v) * w) for v, w in zip(s, w_s)), (h, s)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, R, b, state)

    (_, got), got_grads = value_and_grads(split)
    with jax.default_matmul_precision("highest"):
        (_, want), want_grads = value_and_grads(whole)
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, c) <= 1e-5
    for a, c in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(a, c) <= 1e-4
    one = jax.make_jaxpr(lambda x: run(x, R, b, state=state, resets=resets[:, 6:]))(x[:, 6:])
    assert not primitives(one.jaxpr) & {"pallas_call", "scan", "while", "pad"}, primitives(one.jaxpr)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,fields", [
    ((4, 200, 4, 64), {}),  # one program per head
    ((4, 200, 4, 64), {"splits": 4}),
    ((16, 160, 4, 256), {}),  # the benchmark's heads: 16 programs per head exchange h every step
    ((16, 160, 4, 256), {"bwd_warps": 2}),
    ((40, 64, 2, 128), {"max_programs": 8}),  # 2 batch blocks x 2 heads x 4 splits, 2 launches
])
def test_pallas_gpu_slstm_compiled_matches_reference(shape, fields):
    """The compiled GPU kernels (not interpret mode) with TF32x3 recurrent products
    (float32 accuracy). R's entries are 1 / sqrt(head_dim) at head 256: at 0.3 that
    recurrence is chaotic, and the float32 ``xla`` backend and a 1e-7 change of x both
    leave the reference's path after ~56 steps."""
    assert jax.default_backend() == "gpu"
    r_scale = min(0.3, shape[3] ** -0.5)
    _check("pallas_gpu", _inputs(12, *shape, with_state=True, reset_rate=0.01, r_scale=r_scale), interpret=False,
           config=SLSTMConfig(precision="tf32x3", **fields))


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
