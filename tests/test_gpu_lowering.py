"""Every Pallas GPU kernel lowers for the GPU, forward and backward, on this CPU machine.

Interpret mode (the other kernel tests) runs the kernel bodies as plain JAX, so it cannot
catch a primitive the Triton lowering lacks (a ``slice`` of a loaded value failed the
first GPU run of the chunk-parallel mLSTM, after every interpret-mode test had passed).
Here each op's gradient is lowered for ``cuda`` with ``jax.jit(...).trace(...).lower(
lowering_platforms=("cuda",))``, which runs JAX's Pallas lowering for every kernel: to
Triton IR (the mLSTM and sLSTM kernels; the only GPU fact it needs, the compute
capability, is given as Hopper's 9.0) or to Mosaic GPU (the scans). What this cannot show:
the compilation to PTX (register and shared-memory limits) and the numbers, which the
``gpu``-marked tests check on the accelerator."""

import importlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import delta_rule, gated_linear_attention, linear_scan, mlstm, selective_scan, slstm
from mnemax.kernels.chunked_gpu import ChunkedConfig

# JAX's Triton lowering, a private module: if a JAX release moves it, every test here fails
# (naming it) rather than skipping, so the GPU kernels never silently go unlowered
TRITON_REGISTRATION = "jax._src.pallas.triton.pallas_call_registration"
try:
    reg = importlib.import_module(TRITON_REGISTRATION)
    _reg_error = None
except ImportError as err:
    reg, _reg_error = None, err


def _triton_registration():
    if reg is None:
        pytest.fail(f"cannot import {TRITON_REGISTRATION} ({_reg_error!r}): JAX moved its Triton lowering; "
                    "update TRITON_REGISTRATION and the hopper fixture in tests/test_gpu_lowering.py", pytrace=False)
    return reg


def test_triton_lowering_module_imports():
    assert hasattr(_triton_registration(), "gpu_info_lib")


@pytest.fixture
def hopper(monkeypatch):
    """Lowering without a GPU: the Triton lowering asks the runtime only for the compute capability."""
    monkeypatch.setattr(_triton_registration().gpu_info_lib, "get_gpu_info",
                        lambda: types.SimpleNamespace(compute_capability=90))


def _kernels(fn, *args) -> dict:
    """The Pallas kernels in ``fn``'s gradient lowered for cuda (every input differentiated):
    how many Triton and how many Mosaic GPU custom calls."""
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=tuple(range(len(args)))))
    text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return {"triton": text.count("custom_call @__gpu$xla.gpu.triton"), "mosaic": text.count("custom_call @mosaic_gpu")}


def _arr(rng, shape, dtype=jnp.float32, scale=1.0, offset=0.0):
    return jnp.asarray(offset + scale * rng.standard_normal(shape), dtype)


@pytest.mark.parametrize("fields,kernels", [({"dv": "loop"}, 5), ({}, 4), ({"block_k": 32}, 5)],
                         ids=["dv_loop", "defaults", "key_blocks"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlstm_gpu_kernels_lower(hopper, dtype, fields, kernels):
    """Forward: state walk + per-chunk outputs; backward: adjoint walk + dq/dk/gates per key
    block, and dv in its own loop kernel or (one key block, the defaults here) inside the
    dq/dk kernel, at a split of the value columns (d_v 256: 4 value blocks) and resets."""
    from mnemax.kernels import MLSTMConfig

    config = MLSTMConfig(block_v=64, **fields)
    rng = np.random.default_rng(0)
    B, H, T, dk, dv = 1, 2, 200, 64, 256
    q, k = _arr(rng, (B, H, T, dk), dtype), _arr(rng, (B, H, T, dk), dtype)
    v = _arr(rng, (B, H, T, dv), dtype)
    i, f = _arr(rng, (B, H, T)), _arr(rng, (B, H, T), offset=2.0)
    resets = jnp.asarray(rng.random((B, T)) < 0.05)
    fn = lambda q, k, v, i, f: mlstm(q, k, v, i, f, resets=resets, backend="pallas_gpu", chunk_size=64,  # noqa: E731
                                     interpret=False, config=config)[0]
    assert _kernels(fn, q, k, v, i, f) == {"triton": kernels, "mosaic": 0}


@pytest.mark.parametrize("op,per_call,kernels", [("gla", True, 4), ("gla_channel", True, 8), ("gla_channel", False, 6),
                                                  ("delta", True, 6), ("delta_channel", True, 16),
                                                  ("delta_channel", False, 9)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matrix_state_gpu_kernels_lower(hopper, op, dtype, per_call, kernels):
    """gated_linear_attention: state walk + outputs, adjoint walk + per-chunk gradients, with a
    decay per head or (gla_channel, :mod:`mnemax.kernels.gated_linear_attention.gpu`) per key
    channel; delta_rule: the WY preparation before them and P^T dO before the adjoint walk, a
    decay per head or (delta_channel, :mod:`mnemax.kernels.delta_rule.gpu_channel`) per key
    channel, whose gradients through the WY preparation are a kernel of their own; resets,
    d_v 128 over two value blocks, 200 steps (the last chunk partial). Per-channel decays with
    ``ChunkedConfig.form_per_call`` (the default) lower the per-chunk kernels twice, behind one
    ``lax.cond`` in the forward and one in the backward: holding the factored form only, and
    both forms (for GLA the outputs and gradient kernels, 2 more; for the delta rule everything
    inside the two conds, the walks included, 7 more). Per-channel decays also lower the
    chunks' cumulative decays (``chunk_decays``) once in the forward and once in the backward."""
    config = ChunkedConfig(form_per_call=per_call)
    rng = np.random.default_rng(2)
    B, H, T, dk, dv = 1, 2, 200, 64, 128
    q, k = _arr(rng, (B, H, T, dk), dtype), _arr(rng, (B, H, T, dk), dtype)
    v = _arr(rng, (B, H, T, dv), dtype)
    g = -jnp.abs(_arr(rng, (B, H, T, dk) if op.endswith("channel") else (B, H, T)))
    beta = jax.nn.sigmoid(_arr(rng, (B, H, T)))
    resets = jnp.asarray(rng.random((B, T)) < 0.05)
    if op.startswith("gla"):
        fn = lambda q, k, v, g: gated_linear_attention(q, k, v, g, resets=resets, backend="pallas_gpu",  # noqa: E731
                                                       interpret=False, config=config)[0]
        args = (q, k, v, g)
    else:
        fn = lambda q, k, v, beta, g: delta_rule(q, k, v, beta, g, resets=resets, backend="pallas_gpu",  # noqa: E731
                                                 interpret=False, config=config)[0]
        args = (q, k, v, beta, g)
    assert _kernels(fn, *args) == {"triton": kernels, "mosaic": 0}


@pytest.mark.parametrize("heads,group_heads", [(8, 4), (6, 6)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_heads_gpu_kernels_lower(hopper, dtype, heads, group_heads):
    """Mamba-2's layout (one q/k group for all value heads, a decay per head, d_v 64) with
    ``ChunkedConfig.group_heads``: the forward's outputs and the backward's gradients lower as
    the kernels that run several value heads per program (``_group_out_kernel``,
    ``_group_grads_kernel``; 4 of 8, or all 6, not a power of two), beside the two state
    walks; the per-head kernels are not lowered."""
    import re

    rng = np.random.default_rng(3)
    B, H, T, dk, dv = 1, heads, 200, 64, 64
    q, k = _arr(rng, (B, 1, T, dk), dtype), _arr(rng, (B, 1, T, dk), dtype)
    v = _arr(rng, (B, H, T, dv), dtype)
    g = -jnp.abs(_arr(rng, (B, H, T)))
    resets = jnp.asarray(rng.random((B, T)) < 0.05)
    fn = lambda q, k, v, g: gated_linear_attention(q, k, v, g, resets=resets, backend="pallas_gpu",  # noqa: E731
                                                   interpret=False, config=ChunkedConfig(group_heads=group_heads))[0]
    assert _kernels(fn, q, k, v, g) == {"triton": 4, "mosaic": 0}
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2, 3)))
    names = set(re.findall(r'name = "(\w+)"', grad.trace(q, k, v, g).lower(lowering_platforms=("cuda",)).as_text()))
    assert names == {"kernel", "_group_out_kernel", "_group_grads_kernel"}, names


@pytest.mark.parametrize("fields,kernels", [({}, 2), ({"splits": 4}, 2), ({"splits": 4, "max_programs": 4}, 4)],
                         ids=["one_program", "split", "split_launches"])
def test_slstm_gpu_kernel_lowers(hopper, fields, kernels):
    # one program per head (D 16), a head split over 4 programs that sync every step, and
    # launches of 4 programs each (2 heads: 2 launches each way)
    from mnemax.kernels import SLSTMConfig

    rng = np.random.default_rng(1)
    B, T, H, D = 2, 24, 2, 64 if fields else 16
    x = _arr(rng, (B, T, 4, H, D))
    R = _arr(rng, (H, D, 4, D), scale=D**-0.5)
    b = _arr(rng, (4, H, D))
    fn = lambda x, R, b: slstm(x, R, b, backend="pallas_gpu", interpret=False, config=SLSTMConfig(**fields))[0]  # noqa: E731
    assert _kernels(fn, x, R, b) == {"triton": kernels, "mosaic": 0}


@pytest.mark.parametrize("layout", ["channels", "lanes"])
def test_selective_scan_gpu_kernel_lowers(hopper, layout):
    # both training layouts lower, forward and backward: one lane per channel (the batched
    # lane sums of dB/dC in the row4 register layout), and the lanes training forward and
    # backward (bwd_layout "auto" at this state of 16: the defaults, with the TMA reduce-add
    # of dB/dC, and the training forward in 16-row tiles)
    from mnemax.kernels.selective_scan import SelectiveScanConfig

    config = SelectiveScanConfig(bwd_layout="channels") if layout == "channels" else None
    rng = np.random.default_rng(2)
    Bt, T, Ch, N = 2, 20, 64, 16  # 20 pads to 24 (a partial tile); lanes: 96, where the forward takes 16-row tiles
    T = 96 if layout == "lanes" else T
    x, dt, z = _arr(rng, (Bt, T, Ch)), _arr(rng, (Bt, T, Ch)), _arr(rng, (Bt, T, Ch))
    A = -jnp.exp(_arr(rng, (Ch, N)))
    Bm, Cm = _arr(rng, (Bt, T, N)), _arr(rng, (Bt, T, N))
    D, bias = _arr(rng, (Ch,)), _arr(rng, (Ch,))
    fn = lambda x, dt, A, Bm, Cm, D, z, bias: selective_scan(  # noqa: E731
        x, dt, A, Bm, Cm, D=D, z=z, dt_bias=bias, dt_softplus=True, backend="pallas_gpu", interpret=False, config=config)
    assert _kernels(fn, x, dt, A, Bm, Cm, D, z, bias) == {"triton": 0, "mosaic": 2}


def test_selective_scan_lanes_backward_lowers_per_shard(hopper):
    # under a mesh the kernels run inside a shard_map over the axes the sharding names; the
    # lanes backward's dB/dC buffer, a zeroed mutable ref (jax.new_ref) that its TMA
    # reduce-add copies add into, lowers there too (both kernels, forward and backward, per shard)
    from mnemax.kernels.sharding import KernelSharding

    mesh = jax.make_mesh((2, 2), ("dp", "fsdp"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(4)
    Bt, T, Ch, N = 8, 96, 64, 16
    x, dt, z = _arr(rng, (Bt, T, Ch)), _arr(rng, (Bt, T, Ch)), _arr(rng, (Bt, T, Ch))
    A = -jnp.exp(_arr(rng, (Ch, N)))
    Bm, Cm = _arr(rng, (Bt, T, N)), _arr(rng, (Bt, T, N))

    def loss(x, dt, A, Bm, Cm, z):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            y = selective_scan(x, dt, A, Bm, Cm, z=z, dt_softplus=True, backend="pallas_gpu", interpret=False,
                               sharding=KernelSharding(batch=("dp", "fsdp")))
        return jnp.sum(y ** 2)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    with jax.set_mesh(mesh):
        text = grad.trace(x, dt, A, Bm, Cm, z).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2
    assert "sdy.manual_computation" in text or "shard_map" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_selective_scan_gpu_forward_only_lowers(hopper, dtype):
    # the forward-only call (no backward: fwd_chunk, 16 steps in float32, 32 in bf16) lowers,
    # within Hopper's shared memory (the lowering checks it: chunk 32 in float32 with 3 stages
    # asked for 289 KB of 227 KB on the H100)
    rng = np.random.default_rng(3)
    Bt, T, Ch, N = 2, 100, 64, 16
    x, dt, z = (_arr(rng, (Bt, T, Ch), dtype) for _ in range(3))
    A = -jnp.exp(_arr(rng, (Ch, N)))
    Bm, Cm = _arr(rng, (Bt, T, N), dtype), _arr(rng, (Bt, T, N), dtype)
    fn = jax.jit(lambda x, dt, A, Bm, Cm, z: selective_scan(x, dt, A, Bm, Cm, z=z, dt_softplus=True, backend="pallas_gpu",
                                                            interpret=False))
    text = fn.trace(x, dt, A, Bm, Cm, z).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


def test_linear_scan_gpu_kernel_lowers(hopper):
    rng = np.random.default_rng(3)
    a = jax.nn.sigmoid(_arr(rng, (2, 100, 64)))
    b = _arr(rng, (2, 100, 64))
    fn = lambda a, b: linear_scan(a, b, backend="pallas_gpu", interpret=False)  # noqa: E731
    assert _kernels(fn, a, b) == {"triton": 0, "mosaic": 2}
