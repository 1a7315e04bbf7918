"""The Pallas mLSTM and sLSTM kernels per shard, on the 8 simulated CPU devices
(tests/conftest.py), under meshes whose axes are not the trainer's names: with
``sharding=KernelSharding(batch=(...), heads=...)`` each ``pallas_call`` runs inside a
``jax.shard_map`` on its (batch, head) shard, and outputs, final states and gradients equal
the unsharded reference; ``sharding=None`` under the mesh is an error, not a silently
replicated run. The xLSTM layers hand their ``kernel_sharding`` / ``kernel_config`` fields
to the ops. Interpret mode, tiny shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import MLSTMConfig, mlstm, slstm
from mnemax.kernels.sharding import KernelSharding
from mnemax.layers.xlstm_cells import MLSTMLargeLayer, MLSTMLayer, SLSTMLayer

P = jax.sharding.PartitionSpec
ROWS_COLS = KernelSharding(batch=("rows",), heads="cols")
PALLAS = ["pallas_gpu", "pallas_tpu"]


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _mesh(explicit=True):
    """(4, 2) devices named rows x cols: JAX's default Explicit axes, or Auto ones."""
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh((4, 2), ("rows", "cols"), axis_types=(kind, kind))


def _eqns(jaxpr, name) -> list:
    """Every ``name`` equation in ``jaxpr`` and the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _eqns(inner, name)
    return found


def _mlstm_case(seed=0, B=4, H=2, T=11, dk=8, dv=8):
    rng = np.random.default_rng(seed)
    f32 = lambda *s, scale=1.0, off=0.0: jnp.asarray(off + scale * rng.standard_normal(s), jnp.float32)  # noqa: E731
    args = (f32(B, H, T, dk), f32(B, H, T, dk), f32(B, H, T, dv), f32(B, H, T, scale=2.0), f32(B, H, T, scale=2.0, off=2.0),
            (f32(B, H, dk, dv), f32(B, H, dk), f32(B, H)))
    resets = jnp.asarray(rng.random((B, T)) < 0.15)
    weights = (f32(B, H, T, dv), f32(B, H, dk, dv), f32(B, H, dk), f32(B, H))
    return args, resets, weights


def _slstm_case(seed=1, B=4, T=7, H=2, D=8):
    rng = np.random.default_rng(seed)
    f32 = lambda *s, scale=1.0, off=0.0: jnp.asarray(off + scale * rng.standard_normal(s), jnp.float32)  # noqa: E731
    state = (f32(B, H, D), f32(B, H, D), jnp.abs(f32(B, H, D)) + 1.0, f32(B, H, D))
    args = (f32(B, T, 4, H, D), f32(H, D, 4, D, scale=0.3), f32(4, H, D), state)
    resets = jnp.asarray(rng.random((B, T)) < 0.15)
    weights = (f32(B, T, H, D),) + tuple(f32(B, H, D) for _ in range(4))
    return args, resets, weights


def _call(op, args, **kw):
    """The op on a case's arguments (the last one is the incoming state)."""
    if op == "mlstm":
        return mlstm(*args[:5], state=args[5], chunk_size=4, **kw)
    return slstm(*args[:3], state=args[3], **kw)


def _run(op, backend, args, resets, weights, **kw):
    """(outputs, gradients of every input and the incoming state) of a loss reading every output."""
    def loss(*a):
        h, s = _call(op, a, resets=resets, backend=backend, **kw)
        return sum(jnp.sum(jnp.sin(y) * w) for y, w in zip((h, *s), weights)), (h, s)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return jax.tree.leaves(out), jax.tree.leaves(grads)


def _per_shard_cases():
    """Every (op, backend) once in CI, with explicit and auto mesh axes in turn; the other
    half of the grid under ``-m slow`` (interpret mode is slow: about 10 s a case)."""
    cases = []
    for n, (op, backend) in enumerate((op, b) for op in ("mlstm", "slstm") for b in PALLAS):
        for explicit in (True, False):
            marks = () if explicit == (n % 2 == 0) else (pytest.mark.slow,)
            ids = f"{op}-{backend}-{'explicit_axes' if explicit else 'auto_axes'}"
            cases.append(pytest.param(op, backend, explicit, marks=marks, id=ids))
    return cases


@pytest.mark.parametrize("op,backend,explicit", _per_shard_cases())
def test_pallas_kernels_run_per_shard_on_any_axis_names(op, backend, explicit):
    args, resets, weights = (_mlstm_case if op == "mlstm" else _slstm_case)()
    with jax.default_matmul_precision("highest"):
        want_out, want_grads = _run(op, "reference", args, resets, weights)
    with jax.set_mesh(_mesh(explicit)):
        got_out, got_grads = _run(op, backend, args, resets, weights, interpret=True, sharding=ROWS_COLS)
        jaxpr = jax.make_jaxpr(lambda *a: _call(op, a, resets=resets, backend=backend, interpret=True,
                                                sharding=ROWS_COLS))(*args).jaxpr
    for got, want in zip(got_out, want_out):
        assert rel_err(got, want) <= 1e-4
    for got, want in zip(got_grads, want_grads):
        assert rel_err(got, want) <= 1e-3
    # one shard_map over rows (batch) x cols (heads), every kernel inside it on one (batch, head) shard
    (smap,) = _eqns(jaxpr, "shard_map")
    batch_spec = P("rows", "cols") if op == "mlstm" else P("rows", None, None, "cols")
    assert smap.params["in_specs"][0] == batch_spec
    kernels = _eqns(smap.params["jaxpr"], "pallas_call")
    assert kernels and len(_eqns(jaxpr, "pallas_call")) == len(kernels)
    # the kernels' leading axis: mLSTM rows (batch x heads), sLSTM (head, batch block) groups
    # (GPU) or heads (TPU): 1 per shard of 4 x 2 / (4 x 2)
    assert all(e.invars[0].aval.shape[0] == 1 for e in kernels), [e.invars[0].aval.shape for e in kernels]


@pytest.mark.parametrize("op", ["mlstm", "slstm"])
def test_a_replicated_pallas_run_is_an_error(op):
    """sharding=None (or axes the mesh lacks) under a mesh of 8 devices: the Pallas
    kernels refuse to run replicated; the XLA backend (partitioned by XLA) and a one-step
    call (the closed form, no kernel) need no sharding."""
    args, _, _ = (_mlstm_case if op == "mlstm" else _slstm_case)(T=5)
    call = lambda a, **kw: _call(op, a, **kw)  # noqa: E731
    with jax.set_mesh(_mesh()):
        for backend in PALLAS:
            with pytest.raises(ValueError, match=f"{op} \\(pallas_{backend[7:]}\\): a Pallas kernel traced under a mesh "
                                                 r"of \{'rows': 4, 'cols': 2\} would run replicated"):
                call(args, backend=backend, interpret=True)
            with pytest.raises(ValueError, match="sharding names mesh axis 'data', but the mesh has axes"):
                call(args, backend=backend, interpret=True, sharding=KernelSharding(batch=("data",), heads="tensor"))
        got = call(args, backend="xla")
        step = tuple(a[:, :, :1] for a in args[:5]) + args[5:] if op == "mlstm" else (args[0][:, :1],) + args[1:]
        one = call(step, backend="pallas_gpu", interpret=True)  # no kernel, no sharding needed
    want = call(args, backend="reference")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) <= 1e-5
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(call(step, backend="reference"))):
        assert rel_err(a, b) <= 1e-5


def _layer_cases():
    return [
        ("mlstm", lambda **kw: MLSTMLayer(features=16, num_heads=2, **kw)),
        ("mlstm_large", lambda **kw: MLSTMLargeLayer(features=32, num_heads=2, **kw)),
        ("slstm", lambda **kw: SLSTMLayer(features=16, num_heads=2, **kw)),
    ]


@pytest.mark.parametrize("name,make", _layer_cases(), ids=[c[0] for c in _layer_cases()])
def test_layers_pass_kernel_sharding_through(monkeypatch, name, make):
    """A layer's ``kernel_sharding`` reaches its op: under the rows x cols mesh the layer on
    the Pallas GPU kernel (interpret mode) equals the reference backend's output and state;
    without it the op refuses to run replicated."""
    monkeypatch.setenv("MNEMAX_PALLAS_INTERPRET", "1")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 6, make().features)), jnp.float32)
    resets = jnp.asarray(rng.random((4, 6)) < 0.2)
    params = make(backend="reference").init(jax.random.key(0), x)
    want = make(backend="reference").apply(params, x, resets=resets)
    with jax.set_mesh(_mesh()):
        got = jax.jit(lambda p, x: make(backend="pallas_gpu", kernel_sharding=ROWS_COLS).apply(p, x, resets=resets))(params, x)
        with pytest.raises(ValueError, match="would run replicated"):
            make(backend="pallas_gpu").apply(params, x, resets=resets)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) <= 1e-4


def test_layers_pass_kernel_config_through(monkeypatch):
    """A layer's ``kernel_config`` reaches its op: the state walk's tiles change with it."""
    monkeypatch.setenv("MNEMAX_PALLAS_INTERPRET", "1")
    x = jnp.ones((1, 5, 32))
    params = MLSTMLargeLayer(features=32, num_heads=1, backend="reference").init(jax.random.key(0), x)

    def walk_grid(config):
        layer = MLSTMLargeLayer(features=32, num_heads=1, backend="pallas_gpu", kernel_config=config)
        kernels = _eqns(jax.make_jaxpr(lambda p: layer.apply(p, x))(params).jaxpr, "pallas_call")
        return kernels[0].params["grid_mapping"].grid  # the state walk: (rows, d_qk tiles, d_v tiles)

    assert walk_grid(None) == (1, 1, 1) and walk_grid(MLSTMConfig(state_block=16)) == (1, 1, 2)
