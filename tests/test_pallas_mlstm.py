"""Pallas mlstm kernels (TPU and GPU bodies, in interpret mode on CPU) equal the
sequential reference: outputs, final (C, n, m) and the gradients of q, k, v, i, f and
the incoming state, with resets, an incoming state, lengths that are not a multiple of
the chunk, feature sizes that are not powers of two, gate pre-activations up to +-30,
state carried across calls, and bf16 inputs. Tolerances are the xLSTM issue's: float32
relative error <= 1e-4 for outputs and states, <= 1e-3 for gradients.

The ``gpu``-marked test runs the compiled GPU kernel (Triton) against the reference:
``JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_pallas_mlstm.py``.

Also here: a kernel configuration (``MLSTMConfig``) changed after ``jax.jit`` takes effect
(a new trace, other kernels, the same numbers), and one-step calls (generation) equal the
multi-step call's step for every backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import MLSTMConfig, mlstm
from mnemax.kernels.mlstm import BACKENDS as MLSTM_BACKENDS
from mnemax.kernels.mlstm import common as mlstm_common
from mnemax.kernels.mlstm import gpu as mlstm_gpu

from .contract import primitives

BACKENDS = ["pallas_tpu", "pallas_gpu"]


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _inputs(seed, batch, heads, time, d_qk, d_v, *, with_state, reset_rate, gate_scale=2.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    q, k = rng.standard_normal((2, batch, heads, time, d_qk))
    v = rng.standard_normal((batch, heads, time, d_v))
    if gate_scale == "extreme":  # pre-activations spread over [-30, 30]
        i, f = rng.uniform(-30.0, 30.0, (2, batch, heads, time))
    else:
        i = gate_scale * rng.standard_normal((batch, heads, time))
        f = 2.0 + gate_scale * rng.standard_normal((batch, heads, time))
    state = None
    if with_state:
        state = tuple(map(f32, (rng.standard_normal((batch, heads, d_qk, d_v)), rng.standard_normal((batch, heads, d_qk)),
                                rng.standard_normal((batch, heads)))))
    resets = jnp.asarray(rng.random((batch, time)) < reset_rate) if reset_rate else None
    args = tuple(jnp.asarray(a, dtype) for a in (q, k, v)) + (f32(i), f32(f))
    w_h = f32(rng.standard_normal((batch, heads, time, d_v)))
    w_s = [f32(rng.standard_normal(s)) for s in ((batch, heads, d_qk, d_v), (batch, heads, d_qk), (batch, heads))]
    return args, state, resets, w_h, w_s


def _value_and_grads(backend, args, state, resets, w_h, w_s, chunk, interpret=True, **kw):
    """(h, final state) and the gradients of a loss that reads every output; ``kw``: the
    op's ``config`` / ``sharding``."""
    with_state = state is not None

    def loss(q, k, v, i, f, st):
        h, s = mlstm(q, k, v, i, f, state=st if with_state else None, resets=resets, backend=backend,
                     chunk_size=chunk, interpret=interpret, **kw)
        return jnp.sum(h.astype(jnp.float32) * w_h) + sum(jnp.sum(jnp.sin(x) * w) for x, w in zip(s, w_s)), (h, s)

    st = state if with_state else ()
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))(*args, st)
    return out, grads


def _errors(backend, case, chunk, **kw):
    args, state, resets, w_h, w_s = case
    out, grads = _value_and_grads(backend, args, state, resets, w_h, w_s, chunk, **kw)
    with jax.default_matmul_precision("highest"):  # GPU: XLA's default fp32 dot may use TF32 (~1e-3)
        ref_out, ref_grads = _value_and_grads("reference", args, state, resets, w_h, w_s, chunk)
    out_err = {n: rel_err(a, b) for n, a, b in zip(("h", "C", "n", "m"), jax.tree.leaves(out), jax.tree.leaves(ref_out))}
    names = ("q", "k", "v", "i", "f") + (("C0", "n0", "m0") if state is not None else ())
    grad_err = {n: rel_err(a, b) for n, a, b in zip(names, jax.tree.leaves(grads), jax.tree.leaves(ref_grads))}
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves((out, grads)))
    return out, ref_out, out_err, grad_err


def test_pallas_backends_registered_opt_in():
    assert {"pallas_gpu", "pallas_tpu"} <= set(MLSTM_BACKENDS.available())
    assert MLSTM_BACKENDS.default("gpu") == "xla" and MLSTM_BACKENDS.default("tpu") == "xla"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,chunk,with_state,reset_rate",
    [((2, 2, 37, 8, 12), 16, True, 0.1),  # odd length (3 chunks, 11 padded steps), state in, resets
     ((1, 2, 64, 16, 16), 16, False, 0.0),  # whole chunks, fresh state, no resets
     ((2, 2, 21, 9, 5), 8, True, 0.25)],  # odd feature sizes (GPU pads them), frequent resets
)
def test_pallas_mlstm_matches_reference_fp32(backend, shape, chunk, with_state, reset_rate):
    case = _inputs(sum(shape), *shape, with_state=with_state, reset_rate=reset_rate)
    _, _, out_err, grad_err = _errors(backend, case, chunk)
    assert max(out_err.values()) <= 1e-4, out_err
    assert max(grad_err.values()) <= 1e-3, grad_err


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_mlstm_extreme_gates_finite_and_exact(backend):
    """Gate pre-activations uniform in [-30, 30]: thanks to the stabiliser, outputs,
    states and gradients stay finite and equal the reference."""
    case = _inputs(7, 1, 2, 37, 8, 8, with_state=True, reset_rate=0.1, gate_scale="extreme")
    _, _, out_err, grad_err = _errors(backend, case, 16)
    assert max(out_err.values()) <= 1e-4, out_err
    assert max(grad_err.values()) <= 1e-3, grad_err


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_mlstm_state_round_trip(backend):
    """Two calls chained through the returned state equal one call over the whole
    sequence (the reference), resets included."""
    (q, k, v, i, f), state, resets, _, _ = _inputs(3, 2, 2, 29, 8, 8, with_state=True, reset_rate=0.15)
    run = jax.jit(functools.partial(mlstm, backend=backend, chunk_size=8, interpret=True))
    cut = 13
    h1, s1 = run(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], i[:, :, :cut], f[:, :, :cut], state=state,
                 resets=resets[:, :cut])
    h2, s2 = run(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], i[:, :, cut:], f[:, :, cut:], state=s1,
                 resets=resets[:, cut:])
    h_ref, s_ref = jax.jit(functools.partial(mlstm, backend="reference"))(q, k, v, i, f, state=state, resets=resets)
    assert rel_err(jnp.concatenate([h1, h2], axis=2), h_ref) <= 1e-4
    for got, want in zip(s2, s_ref):
        assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_pallas_mlstm_bf16_inputs(backend):
    """bf16 q, k, v (bf16 matmul operands, float32 accumulation): output in bf16, close to
    the float32 reference on the same rounded inputs."""
    case = _inputs(5, 1, 2, 40, 16, 16, with_state=True, reset_rate=0.1, dtype=jnp.bfloat16)
    out, ref_out, out_err, grad_err = _errors(backend, case, 16)
    assert out[0].dtype == jnp.bfloat16
    assert max(out_err.values()) <= 2e-2, out_err
    assert max(grad_err.values()) <= 3e-2, grad_err


@pytest.mark.parametrize("block_v,state_block", [(16, 16), (32, 64)])
def test_pallas_gpu_mlstm_split_value_columns(block_v, state_block):
    """The GPU kernels split over value columns (4 and 2 value blocks per row: d_v 48
    pads to 64) and the state walk over (d_qk, d_v) tiles (8 tiles of 16 x 16, or one of 32 x 64), with
    an incoming state, resets and an odd length, equal the reference."""
    config = MLSTMConfig(block_v=block_v, state_block=state_block)
    assert mlstm_gpu.value_blocks(16, 64, config) == 64 // block_v
    case = _inputs(13, 2, 2, 37, 24, 48, with_state=True, reset_rate=0.1)
    _, _, out_err, grad_err = _errors("pallas_gpu", case, 16, config=config)
    assert max(out_err.values()) <= 1e-4, out_err
    assert max(grad_err.values()) <= 1e-3, grad_err


def test_pallas_gpu_mlstm_walk_tiles_fill_the_gpu(monkeypatch):
    """The state walk's default tiles: 128 x 128 on 8 warps while batch x heads x tiles
    covers every SM, 64 x 64 on 4 warps when it would leave SMs idle (8k context at batch 8:
    64 rows x 8 tiles; 64k at batch 1: 8 rows x 8 tiles of 128 on 132 SMs -> 8 x 32 of 64);
    set fields win, and a tile that is not a power of two is refused."""
    monkeypatch.setattr(mlstm_gpu, "gpu_sm_count", lambda: 132)
    walk_tiles = mlstm_gpu.walk_tiles
    assert walk_tiles(64, 256, 512, MLSTMConfig()) == (128, 8)
    assert walk_tiles(8, 256, 512, MLSTMConfig()) == (64, 4)
    assert walk_tiles(17, 256, 512, MLSTMConfig()) == (128, 8)  # 17 x 8 = 136 >= 132
    assert walk_tiles(64, 256, 512, MLSTMConfig(state_block=32)) == (32, 4)
    assert walk_tiles(64, 256, 512, MLSTMConfig(state_block=32, state_warps=2)) == (32, 2)
    with pytest.raises(ValueError, match="MLSTMConfig.state_block: got 48; expected None or a power of two >= 16"):
        MLSTMConfig(state_block=48)


def test_pallas_gpu_mlstm_pipelining_fits_shared_memory():
    """Triton's software pipelining keeps num_stages copies of a loop iteration's loads in
    shared memory. The float32 dq/dk kernel at d_qk 256 / d_v 512 with one key block of 256
    asked an H100 for 344,064 B at 2 stages and 327,680 B at 1 (of 232,448): two copies of
    the 163,840 B this estimate gives (plus 16 KB). So float32 there takes key blocks of 128
    (98,304 B) at 1 stage even when block_k asks 256, while bf16 keeps 256 when asked, and
    bf16 (49,152 B) and float32 at head 64 keep the measured 2 stages."""
    def problem(dk, dv, dtype):
        z = jnp.zeros((1, 2, 128, dk), dtype)
        g = jnp.zeros((1, 2, 128), jnp.float32)
        return mlstm_common.make_problem("gpu", z, z, jnp.zeros((1, 2, 128, dv), dtype), g, g, None, 64)

    big32, big16, small32 = problem(256, 512, jnp.float32), problem(256, 512, jnp.bfloat16), problem(64, 64, jnp.float32)
    wide, default = MLSTMConfig(block_k=256), MLSTMConfig()
    assert mlstm_gpu.split_layout(big32, wide) == (2, 128, 8, 64) and mlstm_gpu.split_layout(big16, wide) == (1, 256, 8, 64)
    assert mlstm_gpu.dv_mode(big16, wide) == "fused"  # one key block: dv inside the dq/dk kernel
    assert (mlstm_gpu.dv_mode(big32, default), mlstm_gpu.dv_mode(big16, default)) == ("loop", "loop")
    stage32 = mlstm_gpu.dqk_stage_bytes(big32, jnp.float32, jnp.float32, default)
    stage16 = mlstm_gpu.dqk_stage_bytes(big16, jnp.bfloat16, jnp.bfloat16, default)
    assert (stage32, stage16) == (98_304, 49_152)
    stages = default.num_stages
    assert mlstm_gpu.pipeline_stages(stage32, stages) == 1
    assert mlstm_gpu.pipeline_stages(stage16, stages) == 2
    assert mlstm_gpu.pipeline_stages(mlstm_gpu.dqk_stage_bytes(small32, jnp.float32, jnp.float32, default), stages) == 2
    # the dq/dk kernel's own 3 stages (dqk_stages, the default): 3 x 49,152 B of bf16 loads
    # fit beside the reserve; float32 (98,304 B) falls back to 1
    assert mlstm_gpu.pipeline_stages(stage16, default.dqk_stages) == 3
    assert mlstm_gpu.pipeline_stages(stage32, default.dqk_stages) == 1


@pytest.mark.parametrize("case", ["odd", "extreme", "bf16"])
def test_pallas_gpu_mlstm_key_blocks(case):
    """The GPU backward with several key blocks (dq, dk and the gates per key block, looping
    over value blocks; dv in its own loop kernel): 4 key blocks of 8 (d_qk 24 pads to 32)
    and 4 value blocks of 16 (d_v 48 pads to 64), with an incoming state, resets, an odd
    length; gates up to +-30 and bf16 inputs at the shapes of those tests (2 key blocks)."""
    config = MLSTMConfig(block_k=8, block_v=16)
    if case == "extreme":  # the extreme-gate test's inputs (2 key blocks): at d 24 / 48 every
        # backend, xla included, is 5e-3 off the recurrent reference in dq and dk there
        args = _inputs(7, 1, 2, 37, 8, 8, with_state=True, reset_rate=0.1, gate_scale="extreme")
    elif case == "bf16":  # the bf16 test's inputs (2 key blocks); at d 24 / 48 bf16 rounding puts
        # every backend, xla included, at the 3e-2 tolerance
        args = _inputs(5, 1, 2, 40, 16, 16, with_state=True, reset_rate=0.1, dtype=jnp.bfloat16)
    else:
        args = _inputs(17, 2, 2, 37, 24, 48, with_state=True, reset_rate=0.1)
    _, _, out_err, grad_err = _errors("pallas_gpu", args, 16, config=config)
    tol = (2e-2, 3e-2) if case == "bf16" else (1e-4, 1e-3)
    assert max(out_err.values()) <= tol[0], out_err
    assert max(grad_err.values()) <= tol[1], grad_err


@pytest.mark.parametrize("fields", [
    {"dv": "loop"},  # dv: one program per (row, chunk) looping over the value blocks
    {"dv": "auto", "block_k": 8},  # 4 key blocks: dv in its own loop kernel
    {},  # the defaults: dv inside the dq/dk program (one key block: d_qk 24 pads to 32)
])
def test_pallas_gpu_mlstm_kernel_variants(fields):
    """Each GPU kernel layout (MLSTMConfig) at 4 value blocks of 16 (d_v 48 pads to 64), with
    an incoming state, resets and an odd length, equals the reference."""
    case = _inputs(19, 2, 2, 37, 24, 48, with_state=True, reset_rate=0.1)
    _, _, out_err, grad_err = _errors("pallas_gpu", case, 16, config=MLSTMConfig(block_v=16, **fields))
    assert max(out_err.values()) <= 1e-4, out_err
    assert max(grad_err.values()) <= 1e-3, grad_err


@pytest.mark.parametrize("fields,message", [
    ({"dv": "fast"}, "MLSTMConfig.dv: got 'fast'; expected 'auto', 'loop' or 'fused'"),
    ({"num_warps": 3}, "MLSTMConfig.num_warps: got 3; expected a power of two from 1 to 32"),
    ({"dqk_stages": 0}, "MLSTMConfig.dqk_stages: got 0; expected a positive int or None"),
    ({"block_v": 24}, "MLSTMConfig.block_v: got 24; expected None or a power of two >= 16"),
    ({"block_k": 4}, "MLSTMConfig.block_k: got 4; expected a power of two >= 8"),
    ({"fwd": "grid"}, "unexpected keyword argument 'fwd'"),  # a removed variant
])
def test_mlstm_config_refuses_bad_fields(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MLSTMConfig(**fields)


def test_pallas_gpu_mlstm_fused_dv_needs_one_key_block():
    # d_qk 16 in key blocks of 8: dv inside the dq/dk programs would need the other key block's dC rows
    args = _inputs(1, 1, 1, 16, 16, 8, with_state=False, reset_rate=0.0)
    with pytest.raises(ValueError, match="MLSTMConfig.dv='fused' needs one key block, got 2"):
        _errors("pallas_gpu", args, 8, config=MLSTMConfig(dv="fused", block_k=8))
    with pytest.raises(TypeError, match="config must be an MLSTMConfig or None, got dict"):
        mlstm(*args[0], backend="pallas_gpu", interpret=True, config={"dv": "loop"})


def _pallas_calls(jaxpr) -> list:
    """Every pallas_call equation in ``jaxpr`` and the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _pallas_calls(inner)
    return found


def test_pallas_gpu_mlstm_config_change_after_jit_takes_effect():
    """One jitted function, the config a static argument: a second config makes a trace of
    its own with other kernels (the state walk's tiles, dv's layout), and each run equals the
    reference (the kernels read nothing but their arguments). (How often a config is traced
    is JAX's business: a process's first interpret-mode run registers a config option, and
    the next call retraces.)"""
    traces = []

    @functools.partial(jax.jit, static_argnums=1)
    def grads(args, config):
        traces.append(config)
        loss = lambda *a: jnp.sum(mlstm(*a, backend="pallas_gpu", chunk_size=8, interpret=True, config=config)[0])  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)

    (q, k, v, i, f), _, _, _, _ = _inputs(3, 1, 2, 19, 32, 32, with_state=False, reset_rate=0.0)
    args = (q, k, v, i, f)
    small = MLSTMConfig(state_block=16, dv="loop")  # walk tiles 16 x 16: grid (2, 2, 2); dv in its own kernel
    default = MLSTMConfig()  # one walk tile of 32 x 32; dv inside the dq/dk kernel
    with jax.default_matmul_precision("highest"):
        want = jax.grad(lambda *a: jnp.sum(mlstm(*a, backend="reference")[0]), argnums=(0, 1, 2, 3, 4))(*args)
    for config in (small, default):
        got = grads(args, config)
        assert max(rel_err(g, w) for g, w in zip(got, want)) <= 1e-3
    assert set(traces) == {small, default}  # the second config made a trace of its own
    jaxprs = {c: grads.trace(args, c).jaxpr for c in (small, default)}
    grids = {c: [e.params["grid_mapping"].grid for e in _pallas_calls(j.jaxpr)] for c, j in jaxprs.items()}
    assert len(grids[small]) == 5 and len(grids[default]) == 4, grids
    assert grids[small][0] == (2, 2, 2) and grids[default][0] == (2, 1, 1), grids


# ----------------------------------------------------------------------------- one step (generation)


@pytest.mark.parametrize("backend", ["reference", "parallel", "xla", "pallas_gpu", "pallas_tpu"])
def test_one_step_equals_the_multi_step_call(backend):
    """Prefix of 8 steps, then one step (time == 1, the closed form), from a nonzero state,
    with a reset on that step in one row: outputs, final state and the gradients of every
    input and of the incoming state equal one reference call over the 9 steps. The one-step
    call pads nothing and launches no kernel."""
    (q, k, v, i, f), state, _, w_h, w_s = _inputs(29, 2, 2, 9, 8, 12, with_state=True, reset_rate=0.0)
    resets = jnp.asarray(np.array([[False, False, True, False, False, False, False, False, True],
                                   [False, True, False, False, False, False, False, False, False]]))
    run = functools.partial(mlstm, backend=backend, chunk_size=4, interpret=True)

    def split(q, k, v, i, f, st):
        t = slice(None, 8), slice(8, None)
        h1, s1 = run(*(a[:, :, t[0]] for a in (q, k, v, i, f)), state=st, resets=resets[:, t[0]])
        h2, s2 = run(*(a[:, :, t[1]] for a in (q, k, v, i, f)), state=s1, resets=resets[:, t[1]])
        return jnp.concatenate([h1, h2], axis=2), s2

    def whole(q, k, v, i, f, st):
        return mlstm(q, k, v, i, f, state=st, resets=resets, backend="reference")

    def value_and_grads(fn):
        def loss(*a):
            h, s = fn(*a)
            return jnp.sum(h * w_h) + sum(jnp.sum(jnp.sin(x) * w) for x, w in zip(s, w_s)), (h, s)

        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))(q, k, v, i, f, state)

    (_, got), got_grads = value_and_grads(split)
    with jax.default_matmul_precision("highest"):
        (_, want), want_grads = value_and_grads(whole)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) <= 1e-5
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(a, b) <= 1e-4
    one = jax.make_jaxpr(lambda *a: run(*a, state=state, resets=resets[:, 8:]))(*(a[:, :, 8:] for a in (q, k, v, i, f)))
    assert not primitives(one.jaxpr) & {"pallas_call", "scan", "while", "pad", "custom_vjp_call"}, primitives(one.jaxpr)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, (1e-4, 1e-3)), (jnp.bfloat16, (2e-2, 3e-2))])
@pytest.mark.parametrize("dims", [(11, 2, 4, 300, 64, 64), (12, 1, 2, 200, 256, 512)], ids=["head64", "qk256_v512"])
def test_pallas_gpu_mlstm_compiled_matches_reference(dtype, tol, dims):
    """The compiled GPU kernel (not interpret mode): a model-sized head, and xLSTM-sized heads
    (d_qk 256, d_v 512: 8 value blocks of 64 columns per row, 2 key blocks)."""
    assert jax.default_backend() == "gpu"
    case = _inputs(*dims, with_state=True, reset_rate=0.01, dtype=dtype)
    _, _, out_err, grad_err = _errors("pallas_gpu", case, 64, interpret=False)
    assert max(out_err.values()) <= tol[0], out_err
    assert max(grad_err.values()) <= tol[1], grad_err
