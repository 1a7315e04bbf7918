"""Pallas mlstm kernels (TPU and GPU bodies, in interpret mode on CPU) equal the
sequential reference: outputs, final (C, n, m) and the gradients of q, k, v, i, f and
the incoming state, with resets, an incoming state, lengths that are not a multiple of
the chunk, feature sizes that are not powers of two, gate pre-activations up to +-30,
state carried across calls, and bf16 inputs. Tolerances are the xLSTM issue's: float32
relative error <= 1e-4 for outputs and states, <= 1e-3 for gradients.

The ``gpu``-marked test runs the compiled GPU kernel (Triton) against the reference:
``JAX_PLATFORMS=cuda python -m pytest -m gpu tests/test_pallas_mlstm.py``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import available, dispatch, mlstm

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


def _value_and_grads(backend, args, state, resets, w_h, w_s, chunk, interpret=True):
    """(h, final state) and the gradients of a loss that reads every output."""
    with_state = state is not None

    def loss(q, k, v, i, f, st):
        h, s = mlstm(q, k, v, i, f, state=st if with_state else None, resets=resets, backend=backend,
                     chunk_size=chunk, interpret=interpret)
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
    assert {"pallas_gpu", "pallas_tpu"} <= set(available("mlstm"))
    assert dispatch.default_backend("mlstm", "gpu") == "xla" and dispatch.default_backend("mlstm", "tpu") == "xla"


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
def test_pallas_gpu_mlstm_split_value_columns(monkeypatch, block_v, state_block):
    """The GPU kernels split over value columns (4 and 2 per-chunk programs per row: d_v 48
    pads to 64) and the state walk over (d_qk, d_v) tiles (8 tiles of 16 x 16, or one of 32 x 64), with
    an incoming state, resets and an odd length, equal the reference."""
    from mnemax.kernels import pallas_mlstm_gpu

    monkeypatch.setitem(pallas_mlstm_gpu.GPU_OPTIONS, "block_v", block_v)
    monkeypatch.setitem(pallas_mlstm_gpu.GPU_OPTIONS, "state_block", state_block)
    assert pallas_mlstm_gpu.value_blocks(16, 64) == 64 // block_v
    case = _inputs(13, 2, 2, 37, 24, 48, with_state=True, reset_rate=0.1)
    _, _, out_err, grad_err = _errors("pallas_gpu", case, 16)
    assert max(out_err.values()) <= 1e-4, out_err
    assert max(grad_err.values()) <= 1e-3, grad_err


def test_pallas_gpu_mlstm_walk_tiles_fill_the_gpu(monkeypatch):
    """The state walk's default tiles: 128 x 128 on 8 warps while batch x heads x tiles
    covers every SM, 64 x 64 on 4 warps when it would leave SMs idle (8k context at batch 8:
    64 rows x 8 tiles; 64k at batch 1: 8 rows x 8 tiles of 128 on 132 SMs -> 8 x 32 of 64);
    set options win, and a tile that is not a power of two is refused."""
    from mnemax.kernels import pallas_mlstm_gpu as pg

    monkeypatch.setattr(pg, "_sm_count", lambda: 132)
    assert pg.walk_tiles(64, 256, 512) == (128, 8)
    assert pg.walk_tiles(8, 256, 512) == (64, 4)
    assert pg.walk_tiles(17, 256, 512) == (128, 8)  # 17 x 8 = 136 >= 132
    monkeypatch.setitem(pg.GPU_OPTIONS, "state_block", 32)
    assert pg.walk_tiles(64, 256, 512) == (32, 4)
    monkeypatch.setitem(pg.GPU_OPTIONS, "state_warps", 2)
    assert pg.walk_tiles(64, 256, 512) == (32, 2)
    monkeypatch.setitem(pg.GPU_OPTIONS, "state_block", 48)
    with pytest.raises(ValueError, match="state_block'\\]: got 48"):
        pg.walk_tiles(8, 256, 512)


def test_pallas_gpu_mlstm_pipelining_fits_shared_memory(monkeypatch):
    """Triton's software pipelining keeps num_stages copies of a loop iteration's loads in
    shared memory. The float32 dq/dk kernel at d_qk 256 / d_v 512 with one key block of 256
    asked an H100 for 344,064 B at 2 stages and 327,680 B at 1 (of 232,448): two copies of
    the 163,840 B this estimate gives (plus 16 KB). So float32 there takes key blocks of 128
    (98,304 B) at 1 stage even when block_k asks 256, while bf16 keeps 256 when asked, and
    bf16 (49,152 B; 65,536 B with dv inside) and float32 at head 64 keep the measured 2 stages."""
    from mnemax.kernels import pallas_mlstm
    from mnemax.kernels import pallas_mlstm_gpu as pg

    def problem(dk, dv, dtype):
        z = jnp.zeros((1, 2, 128, dk), dtype)
        g = jnp.zeros((1, 2, 128), jnp.float32)
        return pallas_mlstm.make_problem("gpu", z, z, jnp.zeros((1, 2, 128, dv), dtype), g, g, None, 64)

    big32, big16, small32 = problem(256, 512, jnp.float32), problem(256, 512, jnp.bfloat16), problem(64, 64, jnp.float32)
    monkeypatch.setitem(pg.GPU_OPTIONS, "block_k", 256)
    assert pg._split_layout(big32) == (2, 128, 8, 64) and pg._split_layout(big16) == (1, 256, 8, 64)
    monkeypatch.setitem(pg.GPU_OPTIONS, "block_k", 128)  # the default
    assert (pg._dv_mode(big32), pg._dv_mode(big16)) == ("loop", "loop")
    assert pg.dqk_stage_bytes(big32, jnp.float32, jnp.float32) == 98_304
    assert pg.dqk_stage_bytes(big16, jnp.bfloat16, jnp.bfloat16) == 49_152
    monkeypatch.setitem(pg.GPU_OPTIONS, "dv", "fused")  # the other key block's dC rows too
    assert pg.dqk_stage_bytes(big16, jnp.bfloat16, jnp.bfloat16) == 65_536
    assert pg.pipeline_stages(pg.dqk_stage_bytes(big32, jnp.float32, jnp.float32)) == 1
    assert pg.pipeline_stages(pg.dqk_stage_bytes(big16, jnp.bfloat16, jnp.bfloat16)) == 2
    assert pg.pipeline_stages(pg.dqk_stage_bytes(small32, jnp.float32, jnp.float32)) == 2
    # the dq/dk kernel's own 3 stages (dqk_stages, the default): 3 x 49,152 B of bf16 loads
    # fit beside the reserve; float32 (98,304 B) falls back to 1
    monkeypatch.setitem(pg.GPU_OPTIONS, "dv", "loop")
    assert pg.pipeline_stages(pg.dqk_stage_bytes(big16, jnp.bfloat16, jnp.bfloat16), 3) == 3
    assert pg.pipeline_stages(pg.dqk_stage_bytes(big32, jnp.float32, jnp.float32), 3) == 1


@pytest.mark.parametrize("case", ["odd", "extreme", "bf16"])
def test_pallas_gpu_mlstm_split_backward(monkeypatch, case):
    """The GPU "split" backward (dq, dk and the gates per key block, looping over value
    blocks; dv per value block): 4 key blocks of 8 (d_qk 24 pads to 32) and 4 value blocks
    of 16 (d_v 48 pads to 64), with an incoming state, resets, an odd length; gates up to
    +-30 and bf16 inputs at the shapes of those tests (2 key blocks). Equals the reference
    like the fused backward."""
    from mnemax.kernels import pallas_mlstm_gpu

    monkeypatch.setitem(pallas_mlstm_gpu.GPU_OPTIONS, "bwd", "split")
    monkeypatch.setitem(pallas_mlstm_gpu.GPU_OPTIONS, "block_k", 8)
    monkeypatch.setitem(pallas_mlstm_gpu.GPU_OPTIONS, "block_v", 16)
    if case == "extreme":  # the extreme-gate test's inputs (2 key blocks): at d 24 / 48 every
        # backend, xla included, is 5e-3 off the recurrent reference in dq and dk there
        args = _inputs(7, 1, 2, 37, 8, 8, with_state=True, reset_rate=0.1, gate_scale="extreme")
    elif case == "bf16":  # the bf16 test's inputs (2 key blocks); at d 24 / 48 bf16 rounding puts
        # every backend, xla included, at the 3e-2 tolerance
        args = _inputs(5, 1, 2, 40, 16, 16, with_state=True, reset_rate=0.1, dtype=jnp.bfloat16)
    else:
        args = _inputs(17, 2, 2, 37, 24, 48, with_state=True, reset_rate=0.1)
    _, _, out_err, grad_err = _errors("pallas_gpu", args, 16)
    tol = (2e-2, 3e-2) if case == "bf16" else (1e-4, 1e-3)
    assert max(out_err.values()) <= tol[0], out_err
    assert max(grad_err.values()) <= tol[1], grad_err


@pytest.mark.parametrize("options", [
    {"bwd": "fused", "fwd": "grid"},  # one program per (row, value block, chunk); gradient partials summed
    {"fwd": "grid", "dv": "grid", "block_k": 8},  # outputs and dv per (row, value block, chunk); 4 key blocks
    {"dv": "loop"},  # dv: one program per (row, chunk) looping over the value blocks
    {"dv": "auto", "block_k": 8},  # 4 key blocks: dv in its own loop kernel
    {"dv": "fused", "block_k": 8},  # 4 key blocks, each writing dv for one of the 4 value blocks
    {"dv": "loop", "block_k": 8, "bwd_denom": "recompute"},  # dq/dk: scores before the value loop
    {},  # the defaults: loop forward, dv inside the dq/dk program (one key block: d_qk 24 pads to 32)
])
def test_pallas_gpu_mlstm_kernel_variants(monkeypatch, options):
    """Each GPU kernel layout (GPU_OPTIONS) at 4 value blocks of 16 (d_v 48 pads to 64), with
    an incoming state, resets and an odd length, equals the reference."""
    from mnemax.kernels import pallas_mlstm_gpu

    monkeypatch.setitem(pallas_mlstm_gpu.GPU_OPTIONS, "block_v", 16)
    for key, value in options.items():
        monkeypatch.setitem(pallas_mlstm_gpu.GPU_OPTIONS, key, value)
    case = _inputs(19, 2, 2, 37, 24, 48, with_state=True, reset_rate=0.1)
    _, _, out_err, grad_err = _errors("pallas_gpu", case, 16)
    assert max(out_err.values()) <= 1e-4, out_err
    assert max(grad_err.values()) <= 1e-3, grad_err


@pytest.mark.parametrize("options,message", [
    ({"bwd": "fast"}, "GPU_OPTIONS\\['bwd'\\] must be 'fused' or 'split', got 'fast'"),
    ({"fwd": "fast"}, "GPU_OPTIONS\\['fwd'\\] must be 'grid' or 'loop', got 'fast'"),
    ({"dv": "fast"}, "GPU_OPTIONS\\['dv'\\] must be 'grid', 'loop', 'fused' or 'auto', got 'fast'"),
    ({"dv": "fused", "block_k": 8}, "needs the 1 value blocks to split evenly over the 2 key blocks"),
    ({"bwd_denom": "fast"}, "GPU_OPTIONS\\['bwd_denom'\\] must be 'saved' or 'recompute', got 'fast'"),
])
def test_pallas_gpu_mlstm_unknown_kernel_option(monkeypatch, options, message):
    from mnemax.kernels import pallas_mlstm_gpu

    for key, value in options.items():
        monkeypatch.setitem(pallas_mlstm_gpu.GPU_OPTIONS, key, value)
    args = _inputs(1, 1, 1, 16, 16, 8, with_state=False, reset_rate=0.0)
    with pytest.raises(ValueError, match=message):
        _errors("pallas_gpu", args, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, (1e-4, 1e-3)), (jnp.bfloat16, (2e-2, 3e-2))])
@pytest.mark.parametrize("dims", [(11, 2, 4, 300, 64, 64), (12, 1, 2, 200, 256, 512)], ids=["head64", "qk256_v512"])
def test_pallas_gpu_mlstm_compiled_matches_reference(dtype, tol, dims):
    """The compiled GPU kernel (not interpret mode): a model-sized head, and xLSTM-sized heads
    (d_qk 256, d_v 512: 16 programs of 32 value columns per row)."""
    assert jax.default_backend() == "gpu"
    case = _inputs(*dims, with_state=True, reset_rate=0.01, dtype=dtype)
    _, _, out_err, grad_err = _errors("pallas_gpu", case, 64, interpret=False)
    assert max(out_err.values()) <= tol[0], out_err
    assert max(grad_err.values()) <= tol[1], grad_err


def test_pallas_mlstm_runs_per_shard_under_a_mesh():
    """Under a mesh context the kernel runs per (batch, head) shard (jax.shard_map; a bare
    pallas_call is replicated by the SPMD partitioner) and still equals the reference."""
    from mnemax.sharding import make_mesh

    from .contract import primitives

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    case = _inputs(23, 4, 2, 29, 8, 8, with_state=True, reset_rate=0.1)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda *a: mlstm(*a, backend="pallas_gpu", chunk_size=8, interpret=True))(*case[0])
        assert "shard_map" in primitives(jaxpr.jaxpr)
        _, _, out_err, grad_err = _errors("pallas_gpu", case, 8)
    assert max(out_err.values()) <= 1e-4, out_err
    assert max(grad_err.values()) <= 1e-3, grad_err
