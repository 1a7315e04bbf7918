"""Every Pallas TPU kernel lowers for the TPU, forward and backward, on this CPU machine.

Interpret mode (``tests/test_pallas_*.py``) runs the kernel bodies as plain JAX, so it cannot
catch what only the Mosaic lowering checks: a block shape that breaks the TPU tiling rule (the
last two block dims multiples of (8, 128) or equal to the array's), a primitive or a layout the
lowering lacks, an invalid Mosaic module. Here each op is lowered for ``tpu`` with
``jax.jit(...).trace(...).lower(lowering_platforms=("tpu",))`` through its public entry
(``backend="pallas_tpu"``), forward alone and its gradient (every input differentiated: the
custom VJP's forward, which saves the chunk boundaries, and the backward kernel), at the
shapes and dtypes the models pass, and the module must hold the kernels' Mosaic custom calls
(``tpu_custom_call``, named by ``kernel_name``).

The lowering asks for the TPU generation (the ``sign`` in the mLSTM backward, for one; with no
TPU it fails with "Unsupported TPU device kind: cpu"): JAX reads it from the abstract mesh's
``AbstractDevice`` (``jax._src.tpu_info.get_device_kind``), so every lowering here runs under
``jax.sharding.use_abstract_mesh`` of a mesh with no axes whose device is a TPU v5e (or, for
the kernels per shard, the trainer's mesh axes with that device). What this cannot show: the
Mosaic compiler's own passes (layout inference, VMEM limits), which run only on a TPU, and the
numbers (``tests/test_pallas_*.py`` check them in interpret mode)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import delta_rule, gated_linear_attention, linear_scan, mlstm, selective_scan, slstm
from mnemax.kernels.sharding import KernelSharding

TPU_V5E = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
FWD, BWD = "_tpu_fwd_kernel", "_tpu_bwd_kernel"
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
MODES = pytest.mark.parametrize("mode", ["forward", "gradient"])
TRAINER_SHARDING = KernelSharding(batch=("data", "fsdp"), heads="tensor")  # the scans' split on the trainer's mesh
_CALL = re.compile(r'custom_call @tpu_custom_call\(.*kernel_name = "(\w+)".* : \((.*)\) -> ')


def _tpu_mesh(sizes=None):
    """An abstract mesh whose device is a TPU v5e: with no axes (``sizes`` None) it only names
    the generation; with axes the kernels run per shard (``mnemax.kernels.sharding.plan``)."""
    names = tuple(sizes or ())
    return jax.sharding.AbstractMesh(tuple((sizes or {}).values()), names,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(names), abstract_device=TPU_V5E)


def _loss(fn):
    return lambda *a: sum(jnp.sum(y.astype(jnp.float32) ** 2) for y in jax.tree.leaves(fn(*a)))


def _lower(fn, args, mode, mesh=None) -> str:
    """The StableHLO text of ``fn(*args)`` (mode "forward") or of its gradient in every
    argument (mode "gradient"), lowered for the TPU."""
    f = fn if mode == "forward" else jax.grad(_loss(fn), argnums=tuple(range(len(args))))
    with jax.sharding.use_abstract_mesh(mesh or _tpu_mesh()):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def _kernels(text) -> list[tuple[str, str]]:
    """(kernel_name, operand types) of every Mosaic TPU custom call, in program order."""
    calls = [line for line in text.splitlines() if "custom_call @tpu_custom_call" in line]
    found = [_CALL.search(line) for line in calls]
    assert all(found), f"unparsed tpu_custom_call: {calls}"
    return [m.groups() for m in found]


def _check(text, mode, dtype=jnp.float32, bf16_kernel=True):
    """The forward kernel, and for the gradient the backward kernel after it; bf16 data reaches
    both as bf16 (``bf16_kernel``: where the kernels read the input dtype)."""
    kernels = _kernels(text)
    assert [name for name, _ in kernels] == ([FWD] if mode == "forward" else [FWD, BWD])
    if dtype == jnp.bfloat16 and bf16_kernel:
        assert all("bf16" in operands for _, operands in kernels), kernels


def _arr(rng, shape, dtype=jnp.float32, scale=1.0, offset=0.0):
    return jnp.asarray(offset + scale * rng.standard_normal(shape), dtype)


def _selective_scan_case(dtype, Bt=2, T=100, Ch=256, N=16):
    # Mamba's call (layers/mamba.py): softplus(dt + dt_bias), D skip, silu(z) gate, carried state
    # and resets, state 16; 100 steps pad to whole chunks of 16, 256 channels are 2 lane blocks
    rng = np.random.default_rng(0)
    x, dt, z = (_arr(rng, (Bt, T, Ch), dtype) for _ in range(3))
    A = -jnp.exp(_arr(rng, (Ch, N)))
    Bm, Cm = _arr(rng, (Bt, T, N), dtype), _arr(rng, (Bt, T, N), dtype)
    D, bias, h0 = _arr(rng, (Ch,)), _arr(rng, (Ch,)), _arr(rng, (Bt, Ch, N))
    resets = jnp.asarray(rng.random((Bt, T)) < 0.05)

    def fn(x, dt, A, Bm, Cm, D, z, bias, h0):
        # the sharding is read only under a mesh with axes (the per-shard test's)
        return selective_scan(x, dt, A, Bm, Cm, D=D, z=z, dt_bias=bias, dt_softplus=True, h0=h0, resets=resets,
                              return_state=True, backend="pallas_tpu", interpret=False, sharding=TRAINER_SHARDING)

    return fn, (x, dt, A, Bm, Cm, D, z, bias, h0)


@MODES
@DTYPES
def test_selective_scan_tpu_kernels_lower(dtype, mode):
    fn, args = _selective_scan_case(dtype)
    _check(_lower(fn, args, mode), mode, dtype)


def _linear_scan_case(dtype, reverse):
    # the ELM's traces (layers/elm.py): (batch, time, *features) with a carried state and
    # resets; features 4 x 64 flatten to 2 lane blocks, 100 steps pad to chunks of 32
    rng = np.random.default_rng(1)
    a = jax.nn.sigmoid(_arr(rng, (2, 100, 4, 64))).astype(dtype)
    b, h0 = _arr(rng, (2, 100, 4, 64), dtype), _arr(rng, (2, 4, 64), dtype)
    resets = jnp.asarray(rng.random((2, 100)) < 0.05)

    def fn(a, b, h0):
        return linear_scan(a, b, h0=h0, resets=resets, reverse=reverse, backend="pallas_tpu", interpret=False,
                           sharding=TRAINER_SHARDING)

    return fn, (a, b, h0)


@MODES
@DTYPES
@pytest.mark.parametrize("reverse", [False, True], ids=["forward_scan", "reverse_scan"])
def test_linear_scan_tpu_kernels_lower(dtype, mode, reverse):
    fn, args = _linear_scan_case(dtype, reverse)
    _check(_lower(fn, args, mode), mode, dtype)


def test_linear_scan_tpu_kernels_lower_per_shard_under_a_mesh():
    # batch over data x fsdp, the first trailing dimension (4 features) over tensor
    fn, args = _linear_scan_case(jnp.bfloat16, False)
    text = _lower(fn, args, "gradient", _tpu_mesh({"data": 2, "fsdp": 1, "tensor": 2}))
    _check(text, "gradient", jnp.bfloat16)
    assert "sdy.manual_computation" in text or "shard_map" in text


def _mlstm_case(dtype, B=2, H=4, T=200, dk=128, dv=256):
    # the xLSTM blocks' call (layers/xlstm_cells.py): chunk 64, a carried (C, n, m) and resets;
    # d_v = 2 d_qk as in xLSTM 7B (qk_dim_factor 0.5); 200 steps pad to 4 chunks
    rng = np.random.default_rng(2)
    q, k, v = _arr(rng, (B, H, T, dk), dtype), _arr(rng, (B, H, T, dk), dtype), _arr(rng, (B, H, T, dv), dtype)
    i, f = _arr(rng, (B, H, T)), _arr(rng, (B, H, T), offset=2.0)
    state = (_arr(rng, (B, H, dk, dv), scale=0.1), jnp.abs(_arr(rng, (B, H, dk))), _arr(rng, (B, H)))
    resets = jnp.asarray(rng.random((B, T)) < 0.05)

    def fn(q, k, v, i, f, state):
        return mlstm(q, k, v, i, f, state=state, resets=resets, chunk_size=64, backend="pallas_tpu", interpret=False,
                     sharding=TRAINER_SHARDING)

    return fn, (q, k, v, i, f, state)


@MODES
@DTYPES
def test_mlstm_tpu_kernels_lower(dtype, mode):
    fn, args = _mlstm_case(dtype)
    _check(_lower(fn, args, mode), mode, dtype)


def _slstm_case(dtype, B=2, T=40, H=2, D=192):
    # the sLSTM blocks' call: head_dim 192 (xlstm-125m: 768 over 4 heads), a carried state and
    # resets; 40 steps pad to time blocks of 16, batch 2 to a block of 8
    rng = np.random.default_rng(3)
    x = _arr(rng, (B, T, 4, H, D), dtype)
    R, b = _arr(rng, (H, D, 4, D), scale=D**-0.5), _arr(rng, (4, H, D))
    state = (_arr(rng, (B, H, D)), _arr(rng, (B, H, D)), jnp.abs(_arr(rng, (B, H, D))) + 1.0, _arr(rng, (B, H, D)))
    resets = jnp.asarray(rng.random((B, T)) < 0.05)

    def fn(x, R, b, state):
        return slstm(x, R, b, state=state, resets=resets, backend="pallas_tpu", interpret=False, sharding=TRAINER_SHARDING)

    return fn, (x, R, b, state)


@MODES
@DTYPES
def test_slstm_tpu_kernels_lower(dtype, mode):
    # slstm casts its inputs to float32 before the kernels (bf16 only changes the entry's casts)
    fn, args = _slstm_case(dtype)
    _check(_lower(fn, args, mode), mode, dtype, bf16_kernel=False)


def _matrix_state_case(op, dtype, gate="head", B=2, H=4, T=200, dk=128, dv=128):
    # the GLA / (Gated) DeltaNet / KDA layers' call: heads of 128, chunk 64, a decay per head,
    # per key channel (or none), a carried state and resets; 200 steps pad to 4 chunks
    rng = np.random.default_rng(4)
    q, k, v = _arr(rng, (B, H, T, dk), dtype), _arr(rng, (B, H, T, dk), dtype), _arr(rng, (B, H, T, dv), dtype)
    g = None if gate == "none" else -jax.nn.softplus(_arr(rng, (B, H, T) + ((dk,) if gate == "channel" else ())))
    beta = jax.nn.sigmoid(_arr(rng, (B, H, T)))
    state = _arr(rng, (B, H, dk, dv), scale=0.1)
    resets = jnp.asarray(rng.random((B, T)) < 0.05)
    kw = dict(resets=resets, chunk_size=64, backend="pallas_tpu", interpret=False, sharding=TRAINER_SHARDING)
    if op == "gla":
        fn = lambda q, k, v, g, state: gated_linear_attention(q, k, v, g, state=state, **kw)  # noqa: E731
        return fn, (q, k, v, g, state)
    fn = lambda q, k, v, beta, g, state: delta_rule(q, k, v, beta, g, state=state, **kw)  # noqa: E731
    return fn, (q, k, v, beta, g, state)


def _check_matrix_state(text, op, mode, dtype, gate="head"):
    """delta_rule: the WY preparation, then the forward walk; with the gradient the backward
    walk after them; gated_linear_attention: the walks alone. Per-key-channel decays take the
    ``_tpu_channel_*`` kernels, each lowered twice: the scores' two forms (factored, sub-chunked)
    behind one ``lax.cond`` per walk. bf16 data reaches each as bf16."""
    names = ["_tpu_wy_kernel"] * (op == "delta") + [FWD] + [BWD] * (mode == "gradient")
    kernels = _kernels(text)
    if gate == "channel":
        want = [n.replace("_tpu_", "_tpu_channel_") for n in names for _ in range(2)]
        assert sorted(name for name, _ in kernels) == sorted(want)
    else:
        assert [name for name, _ in kernels] == names
    if dtype == jnp.bfloat16:
        assert all("bf16" in operands for _, operands in kernels), kernels


@MODES
@DTYPES
@pytest.mark.parametrize("gate", ["none", "head", "channel"])
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_matrix_state_tpu_kernels_lower(op, gate, dtype, mode):
    fn, args = _matrix_state_case(op, dtype, gate)
    if args[-2] is None:  # g None: not an argument to differentiate
        fn, args = (lambda *a, fn=fn: fn(*a[:-1], None, a[-1])), args[:-2] + args[-1:]
    _check_matrix_state(_lower(fn, args, mode), op, mode, dtype, gate)


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_matrix_state_tpu_kernels_lower_per_shard_under_a_mesh(op):
    fn, args = _matrix_state_case(op, jnp.bfloat16)
    text = _lower(fn, args, "gradient", _tpu_mesh({"data": 2, "fsdp": 1, "tensor": 2}))
    _check_matrix_state(text, op, "gradient", jnp.bfloat16)
    assert "sdy.manual_computation" in text or "shard_map" in text


@pytest.mark.parametrize("case", [_selective_scan_case, _mlstm_case, _slstm_case], ids=["selective_scan", "mlstm", "slstm"])
def test_tpu_kernels_lower_per_shard_under_a_mesh(case):
    # under the trainer's mesh (batch over data x fsdp, channels / heads over tensor) the kernels
    # run per shard inside a shard_map, with the per-shard shapes (selective scan: 128 channels)
    fn, args = case(jnp.bfloat16)
    text = _lower(fn, args, "gradient", _tpu_mesh({"data": 2, "fsdp": 1, "tensor": 2}))
    _check(text, "gradient", jnp.bfloat16, bf16_kernel=case is not _slstm_case)
    assert "sdy.manual_computation" in text or "shard_map" in text


def test_tpu_lowering_enforces_the_tiling_rule():
    # the harness is not vacuous: a chunk of 12 steps makes (12, 128) blocks of the 108 padded
    # steps, which the Mosaic lowering rejects (12 is no multiple of 8 nor the full dim)
    _, (x, dt, A, Bm, Cm, D, z, bias, _) = _selective_scan_case(jnp.float32)

    def fn(x, dt, A, Bm, Cm, D, z, bias):
        return selective_scan(x, dt, A, Bm, Cm, D=D, z=z, dt_bias=bias, dt_softplus=True, chunk_size=12,
                              backend="pallas_tpu", interpret=False)

    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        _lower(fn, (x, dt, A, Bm, Cm, D, z, bias), "forward")
