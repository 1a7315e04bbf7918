"""Pallas selective_scan kernels (GPU and TPU) in interpret mode equal the reference:
outputs, final state and the gradients of every input (x, dt, A, B, C, D, z, dt_bias,
h0, and through the final state), with resets, h0, lengths that are not a multiple of
the chunk, channels that are not a multiple of 128, a state size that is not a
multiple of 8, and bf16 inputs. Also: the kernel configuration is a static argument (a
changed config after jit takes effect, a bad one is refused), and a one-step call takes
the closed form on every backend, equal to the multi-step call's step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import selective_scan
from mnemax.kernels.selective_scan import SelectiveScanConfig, common, gpu, gpu_lanes, gpu_lanes_bwd, reference

TOL = {jnp.float32: (6e-4, 2e-3), jnp.bfloat16: (3e-3, 5e-3)}
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0")
CHANNELS = SelectiveScanConfig(bwd_layout="channels")  # the one-lane-per-channel training kernels


def _case(batch, time, chans, n, gated, with_resets, dtype, seed):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    args = {
        "x": jnp.asarray(0.5 * f(batch, time, chans), dtype),
        "dt": jnp.asarray(0.5 * f(batch, time, chans) - 1.0, dtype),
        "A": -jnp.asarray(rng.uniform(0.5, 2.0, (chans, n)).astype(np.float32)),
        "B": jnp.asarray(0.5 * f(batch, time, n), dtype),
        "C": jnp.asarray(0.5 * f(batch, time, n), dtype),
        "D": jnp.asarray(f(chans)),
        "z": jnp.asarray(f(batch, time, chans), dtype) if gated else None,
        "dt_bias": jnp.asarray(0.1 * f(chans)),
        "h0": jnp.asarray(0.5 * f(batch, chans, n)),
    }
    resets = jnp.asarray(rng.random((batch, time)) < 0.15) if with_resets else None
    w = jnp.asarray(0.3 * f(batch, time, chans))
    wh = jnp.asarray(0.3 * f(batch, chans, n))
    return args, resets, w, wh


def _run(backend, args, resets, w, wh, interpret=True, config=None):
    keys = [k for k in NAMES if args[k] is not None]

    def loss(*vals):
        kw = dict(zip(keys, vals))
        y, h = selective_scan(
            kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw.get("z"), dt_bias=kw["dt_bias"],
            dt_softplus=True, h0=kw["h0"], resets=resets, return_state=True, backend=backend, interpret=interpret,
            config=config,
        )
        return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(h * wh), (y, h)

    value_and_grads = jax.jit(jax.value_and_grad(loss, tuple(range(len(keys))), has_aux=True))
    (_, (y, h)), grads = value_and_grads(*[args[k] for k in keys])
    return y, h, dict(zip(keys, grads))


def _check_against_reference(args, resets, w, wh, config=None):
    """The GPU kernels (interpret mode) against the reference: outputs, state, every gradient (float32)."""
    rtol, atol = TOL[jnp.float32]
    y, h, g = _run("pallas_gpu", args, resets, w, wh, config=config)
    y_ref, h_ref, g_ref = _run("reference", args, resets, w, wh)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=rtol, atol=atol)
    for k in g_ref:
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g_ref[k]), rtol=rtol, atol=atol, err_msg=f"gradient of {k}")


def _spy(monkeypatch, module, name):
    """Records the calls of ``module.name`` (which still runs)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_gpu+channels", "pallas_tpu"])
@pytest.mark.parametrize(
    "shape,gated,with_resets,dtype",
    [((2, 21, 5, 4), True, True, jnp.float32), ((1, 19, 130, 6), False, False, jnp.float32),
     ((2, 17, 9, 16), True, True, jnp.bfloat16)],
)
def test_pallas_selective_scan_matches_reference(backend, shape, gated, with_resets, dtype):
    # pallas_gpu: the defaults (bwd_layout "auto": the lanes training forward and backward for
    # these states of at most 16); "+channels": the one-lane-per-channel training kernels
    config = CHANNELS if backend.endswith("+channels") else None
    backend = backend.removesuffix("+channels")
    args, resets, w, wh = _case(*shape, gated, with_resets, dtype, seed=sum(shape))
    rtol, atol = TOL[dtype]
    y, h, g = _run(backend, args, resets, w, wh, config=config)
    y_ref, h_ref, g_ref = _run("reference", args, resets, w, wh)
    assert y.dtype == y_ref.dtype == (jnp.result_type(dtype, dtype))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=rtol, atol=atol)
    for k in g_ref:
        assert g[k].shape == g_ref[k].shape and g[k].dtype == g_ref[k].dtype, k
        np.testing.assert_allclose(np.asarray(g[k], np.float32), np.asarray(g_ref[k], np.float32), rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {k}")


# the default (4 steps) at a chunk it does not divide in CI; other step counts, and the default
# at the default chunk (which test_pallas_selective_scan_matches_reference's channels cases
# run), under -m slow
@pytest.mark.parametrize("red_rows,chunk", [pytest.param(2, 8, marks=pytest.mark.slow), pytest.param(8, 8, marks=pytest.mark.slow),
                                            (4, 6), pytest.param(4, 8, marks=pytest.mark.slow)],
                         ids=["2_rows", "8_rows", "chunk_6", "row4"])
def test_pallas_gpu_backward_lane_sums(red_rows, chunk):
    # The one-lane-per-channel backward: dB and dC are sums over the block's lanes, written
    # for red_rows steps to a scratch and reduced together (with a chunk of 6 and red_rows 4
    # the kernel takes the largest divisor, 3); the scratch's rows are padded to the row4
    # layout's row tile. Every variant equals the reference's gradients.
    config = SelectiveScanConfig(red_rows=red_rows, bwd_layout="channels", chunk=chunk)
    args, resets, w, wh = _case(2, 23, 130, 16, True, True, jnp.float32, seed=11)
    rtol, atol = TOL[jnp.float32]
    y, h, g = _run("pallas_gpu", args, resets, w, wh, config=config)
    y_ref, h_ref, g_ref = _run("reference", args, resets, w, wh)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=rtol, atol=atol)
    for k in g_ref:
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g_ref[k]), rtol=rtol, atol=atol, err_msg=f"gradient of {k}")


def test_pallas_gpu_forward_kernel_under_the_mosaic_interpreter(monkeypatch):
    # The one-lane-per-channel training forward's Mosaic GPU kernel itself (not the grid
    # emulation): constants and h0 read from HBM once, the final state written once, the
    # chunk-boundary states for the backward from the pipeline; run by Mosaic GPU's
    # interpreter. Outputs, state and every gradient equal the reference, with resets, h0 and
    # a length that is no multiple of the chunk.
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    # The interpreter lacks predicated SMEM->GMEM copies, which emit_pipeline issues for its
    # outputs with the predicate "block index changed or last step": always true for the
    # forward's outputs (y and the boundary states move every chunk). The shim checks that
    # and copies unpredicated.
    copy = gpu_callbacks.copy_smem_to_gmem
    seen = []

    def unpredicated(*, predicate, **kw):
        if predicate is not None:
            seen.append(bool(np.all(np.asarray(predicate))))
            assert seen[-1], "a predicated-off copy: the shim would copy it anyway"
        return copy(predicate=None, **kw)

    monkeypatch.setattr(gpu_callbacks, "copy_smem_to_gmem", unpredicated)
    args, resets, w, wh = _case(2, 21, 130, 5, True, True, jnp.float32, seed=23)
    _check_against_reference(args, resets, w, wh, config=SelectiveScanConfig(mosaic_interpret=True, bwd_layout="channels"))
    assert seen and all(seen)


# the ungated bf16 case (the same chunk as the gated one) is -m slow
@pytest.mark.parametrize("dtype,gated,chunk", [(jnp.float32, True, 16), (jnp.bfloat16, True, 32),
                                               pytest.param(jnp.bfloat16, False, 32, marks=pytest.mark.slow)])
def test_pallas_gpu_forward_only_takes_the_longer_chunk(dtype, gated, chunk):
    # A call with no gradient runs the forward at fwd_chunk ("auto": 16 steps in float32, 32
    # for 16-bit sequences) instead of the backward's 8; outputs and final state still equal
    # the reference at a length that is no multiple of either, with resets and h0
    args, resets, _, _ = _case(2, 45, 130, 16, gated, True, dtype, seed=19)
    p = gpu.make_problem(SelectiveScanConfig(), args["x"], args["dt"], args["A"], args["B"], args["C"], None, args["z"],
                         None, None, None, True, training=False)
    assert p.chunk == chunk
    call = lambda backend: selective_scan(  # noqa: E731
        args["x"], args["dt"], args["A"], args["B"], args["C"], D=args["D"], z=args["z"], dt_bias=args["dt_bias"],
        dt_softplus=True, h0=args["h0"], resets=resets, return_state=True, backend=backend, interpret=True)
    (y, h), (y_ref, h_ref) = call("pallas_gpu"), call("reference")
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=rtol, atol=atol)


def _forward_only(args, resets, softplus, backend, interpret=True, config=None):
    return selective_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], D=args["D"], z=args["z"],
                          dt_bias=args["dt_bias"], dt_softplus=softplus, h0=args["h0"], resets=resets,
                          return_state=True, backend=backend, interpret=interpret, config=config)


def _lanes_case(shape, gated, softplus, with_resets, dtype, seed):
    args, resets, _, _ = _case(*shape, gated, with_resets, dtype, seed=seed)
    if not softplus:  # delta = dt + dt_bias itself: keep it positive, so the state decays
        args["dt"] = (0.3 * jnp.abs(args["dt"].astype(jnp.float32))).astype(dtype)
        args["dt_bias"] = 0.1 + jnp.abs(args["dt_bias"])
    return args, resets


LANES_CASES = [
    ((2, 45, 70, 16), True, True, True, jnp.float32, {}),
    ((1, 37, 40, 5), False, False, False, jnp.bfloat16, {"lanes_group": 4}),
    ((2, 20, 33, 32), True, True, True, jnp.float32, {"fwd_chunk": 4, "lanes_group": 2}),
]


@pytest.mark.parametrize("shape,gated,softplus,with_resets,dtype,options", LANES_CASES,
                         ids=["f32_gated_resets", "bf16_state5_no_softplus", "state32_chunk4"])
def test_pallas_gpu_lanes_forward_equals_reference(monkeypatch, shape, gated, softplus, with_resets, dtype, options):
    # The forward-only kernel with each channel's states over 4 lanes, run by Mosaic GPU's
    # interpreter (threads, barriers and copies simulated): outputs and final state equal the
    # reference at lengths no multiple of the chunk (the padding steps: dt = -inf under the
    # softplus, the valid flag without it), channels no multiple of the CTA's 32, a state
    # padded from 5 to 16, 32 states (8 per lane), resets and h0. A spy checks that this
    # kernel ran.
    calls = _spy(monkeypatch, gpu_lanes, "forward")
    args, resets = _lanes_case(shape, gated, softplus, with_resets, dtype, seed=31)
    config = SelectiveScanConfig(**options)
    (y, h), (y_ref, h_ref) = (_forward_only(args, resets, softplus, b, config=config) for b in ("pallas_gpu", "reference"))
    assert calls
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape,gated,with_resets,group", [((2, 21, 40, 16), True, True, 4), ((1, 29, 70, 5), False, False, 8)],
                         ids=["gated_resets", "state5_plain_group8_train_tiles16"])
def test_pallas_gpu_lanes_backward_equals_reference(monkeypatch, shape, gated, with_resets, group):
    # bwd_layout "lanes": the training forward saves its chunk-boundary states in the lanes
    # layout and the backward runs its six passes on 32-channel CTAs, under Mosaic GPU's
    # interpreter. Outputs, final state and every gradient equal the reference, at a length no
    # multiple of the chunk, channels no multiple of 32, a state padded from 5 to 16, with and
    # without a gate, resets and h0. A spy checks that the lanes backward ran. Length 21 pads to
    # 24, so the training forward's tiles are the chunk (8); 29 pads to 32, so they are 16 rows
    # with a bound saved in the middle of each (lanes_train_chunk "auto").
    calls = _spy(monkeypatch, gpu_lanes_bwd, "backward")
    args, resets, w, wh = _case(*shape, gated, with_resets, jnp.float32, seed=41)
    _check_against_reference(args, resets, w, wh, config=SelectiveScanConfig(bwd_layout="lanes", lanes_bwd_group=group))
    assert calls


def test_pallas_gpu_lanes_backward_without_softplus():
    # delta = dt + dt_bias itself: the padding steps' d dt is not 0 there, and d dt_bias must
    # leave it out; every gradient against the reference
    args, resets = _lanes_case((2, 13, 36, 16), True, False, True, jnp.float32, seed=43)
    keys = [k for k in NAMES if args[k] is not None]
    w = jnp.asarray(np.random.default_rng(5).standard_normal((2, 13, 36)).astype(np.float32))

    def grads(backend):
        def loss(*vals):
            kw = dict(zip(keys, vals))
            y, h = selective_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"],
                                  dt_bias=kw["dt_bias"], dt_softplus=False, h0=kw["h0"], resets=resets,
                                  return_state=True, backend=backend, interpret=True,
                                  config=SelectiveScanConfig(bwd_layout="lanes"))
            return jnp.sum(y * w) + jnp.sum(h)
        return jax.grad(loss, tuple(range(len(keys))))(*[args[k] for k in keys])

    rtol, atol = TOL[jnp.float32]
    for k, g, r in zip(keys, grads("pallas_gpu"), grads("reference")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=rtol, atol=atol, err_msg=f"gradient of {k}")


def test_pallas_gpu_lanes_options_are_checked():
    # shape-dependent limits are checked when the kernels are built, naming the option
    a, _, _, _ = _case(1, 16, 8, 4, False, False, jnp.float32, seed=0)
    problem = lambda config, n_args=a: gpu.make_problem(  # noqa: E731
        config, n_args["x"], n_args["dt"], n_args["A"], n_args["B"], n_args["C"], None, None, None, None, None, True)
    p = problem(SelectiveScanConfig())
    assert p.n == 16  # the state 4 is padded to 16 for the lanes kernels
    with pytest.raises(ValueError, match="lanes_group: got 3"):
        gpu.forward(SelectiveScanConfig(lanes_group=3), p, jnp.float32, interpret=True)
    dtypes = {"x": jnp.float32, "dt": jnp.float32, "z": None}
    y16, hl16, bounds16 = gpu.forward(SelectiveScanConfig(), p, jnp.float32, save_bounds=True, interpret=True)
    with pytest.raises(ValueError, match="lanes_bwd_group: got 3"):
        gpu.backward(SelectiveScanConfig(lanes_bwd_group=3), p, y16, jnp.ones_like(hl16), bounds16, dtypes, interpret=True)
    with pytest.raises(ValueError, match="lanes_train_chunk: got 12"):
        gpu.forward(SelectiveScanConfig(lanes_train_chunk=12), p, jnp.float32, save_bounds=True, interpret=True)
    # the lanes backward sums dB and dC with 2 x 16 states on a warp's lanes: 17 states are refused
    b, _, _, _ = _case(1, 16, 8, 17, False, False, jnp.float32, seed=0)
    lanes = SelectiveScanConfig(bwd_layout="lanes")
    q = problem(lanes, b)
    y, hl, bounds = gpu.forward(lanes, q, jnp.float32, save_bounds=True, interpret=True)
    with pytest.raises(ValueError, match="bwd_layout='lanes': got a state of 17"):
        gpu.backward(lanes, q, y, jnp.ones_like(hl), bounds, dtypes, interpret=True)


@pytest.mark.parametrize("segments,shape,reset_at", [(3, (1, 61, 9, 8), 24), pytest.param(5, (2, 45, 9, 4), None, marks=pytest.mark.slow)],
                         ids=["3_segments_resets", "5_segments"])
def test_pallas_gpu_time_split_equals_reference(segments, shape, reset_at):
    # time_split: segments scanned from zero in parallel, joined by their closed-form
    # transitions, then rescanned from their start states. Outputs, final state and every
    # gradient equal the reference, with h0; with a gate, random resets and one on a
    # segment's first step, or with neither (segments 61 -> 24, 24, 13; 45 -> 16, 16, 13)
    with_resets = reset_at is not None
    args, _, w, wh = _case(*shape, with_resets, False, jnp.float32, seed=23)
    # slow decays, so that a segment's start state matters to the next segments
    args["A"] = -jnp.asarray(np.random.default_rng(1).uniform(0.01, 0.05, args["A"].shape).astype(np.float32))
    resets = None
    if with_resets:  # one reset on a segment's first step, one inside the next segment
        resets = jnp.zeros(shape[:2], bool).at[:, reset_at].set(True).at[:, reset_at + 29].set(True)
    _check_against_reference(args, resets, w, wh, config=SelectiveScanConfig(time_split=segments))


def test_pallas_gpu_lanes_forward_under_time_split(monkeypatch):
    # A forward-only call cut into segments (time_split) runs the lanes forward for every
    # segment: outputs and final state equal the reference, with h0, resets and a gate
    calls = _spy(monkeypatch, gpu_lanes, "forward")
    args, resets = _lanes_case((1, 61, 40, 16), True, True, True, jnp.float32, seed=37)
    args["A"] = -jnp.asarray(np.random.default_rng(1).uniform(0.01, 0.05, args["A"].shape).astype(np.float32))
    config = SelectiveScanConfig(time_split=3)
    (y, h), (y_ref, h_ref) = (_forward_only(args, resets, True, b, config=config) for b in ("pallas_gpu", "reference"))
    assert len(calls) == 3  # the full segments from zero, again from their start states, and the last
    rtol, atol = TOL[jnp.float32]
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=rtol, atol=atol)


def test_time_split_auto_fills_idle_sms(monkeypatch):
    # "auto" splits only where batch x channel blocks leaves most SMs idle (here 132 SMs)
    monkeypatch.setattr(jax, "devices", lambda *a: [type("Gpu", (), {"core_count": 132})()])
    auto = SelectiveScanConfig()
    assert common.time_segments(auto, "gpu", 1, 65536, 1536, False) == 11  # 12 CTAs
    assert common.time_segments(auto, "gpu", 8, 2048, 1536, False) == 1  # 96 CTAs: no split
    assert common.time_segments(auto, "gpu", 1, 1024, 1536, False) == 1  # 2 segments of 512 at most: < 4
    assert common.time_segments(auto, "gpu", 1, 65536, 1536, True) == 1  # interpret mode: off
    assert common.time_segments(auto, "tpu", 1, 65536, 1536, False) == 1  # the GPU's only
    assert common.time_segments(SelectiveScanConfig(time_split=5), "gpu", 1, 100, 8, True) == 5


def test_pallas_gpu_red_rows_must_divide_the_chunk():
    a, _, _, _ = _case(1, 8, 4, 4, False, False, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="red_rows"):
        common.Problem(a["x"], a["dt"], a["A"], a["B"], a["C"], None, None, None, None, None, 8, True, red_rows=3)
    # the GPU entry takes the largest divisor of the chunk up to the option
    p = gpu.make_problem(SelectiveScanConfig(red_rows=4, chunk=6), a["x"], a["dt"], a["A"], a["B"], a["C"], None, None,
                         None, None, None, True)
    assert p.red_rows == 3


# ----------------------------------------------------------------------------- the config: a static argument


@pytest.mark.parametrize("field,value,allowed", [
    ("chunk", 0, "a positive integer"), ("fwd_chunk", "long", "'auto' or a positive integer"),
    ("stages", True, "a positive integer"), ("unroll", 0, "a positive integer"), ("red_rows", 0, "a positive integer"),
    ("bwd_layout", "quad", "one of"), ("lanes_group", 2.0, "a positive integer"), ("time_split", 0, "'auto' or a positive"),
    ("approx_math", 1, "True or False"), ("tpu_chunk", 12, "a positive multiple of 8"),
    ("lanes_train_chunk", -8, "'auto' or a positive integer"),
])
def test_a_bad_config_field_is_refused(field, value, allowed):
    with pytest.raises(ValueError, match=rf"SelectiveScanConfig\.{field}: got {value!r}, expected {allowed}"):
        SelectiveScanConfig(**{field: value})
    a, _, _, _ = _case(1, 4, 3, 2, False, False, jnp.float32, seed=0)
    with pytest.raises(TypeError, match="config must be a SelectiveScanConfig or None, got dict"):
        selective_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], config={"chunk": 8})


def test_a_changed_config_after_jit_takes_effect():
    # The config is a static argument: the same jitted function traces again for another
    # config (a Python side effect counts the traces) and lowers to another program (the GPU
    # forward's chunk of 8 steps pads the length 20 to 24, a chunk of 16 to 32); both equal
    # the reference. An equal config reuses the first trace.
    # Pallas' TPU module, which interpret mode imports on its first use, registers a config
    # option that joins jit's cache key: imported first, so that only the configs tell apart
    import jax.experimental.pallas.tpu  # noqa: F401

    args, resets, _, _ = _case(2, 20, 9, 4, True, True, jnp.float32, seed=3)
    traces = []

    def f(x, dt, A, B, C, z, h0, config):
        traces.append(config)
        return selective_scan(x, dt, A, B, C, z=z, h0=h0, resets=resets, dt_softplus=True, backend="pallas_gpu",
                              interpret=True, config=config)

    jf = jax.jit(f, static_argnames="config")
    ins = tuple(args[k] for k in ("x", "dt", "A", "B", "C", "z", "h0"))
    short, long = SelectiveScanConfig(fwd_chunk=8), SelectiveScanConfig(fwd_chunk=16)
    want = reference.scan(*ins[:5], D=None, z=args["z"], dt_bias=None, dt_softplus=True, h0=args["h0"], resets=resets,
                          return_state=False, chunk_size=None)[0]
    rtol, atol = TOL[jnp.float32]
    for config in (short, long, SelectiveScanConfig(fwd_chunk=8)):
        np.testing.assert_allclose(np.asarray(jf(*ins, config=config)), np.asarray(want), rtol=rtol, atol=atol)
    assert traces == [short, long]  # the third call, an equal config, reused the first trace
    texts = [jf.trace(*ins, config=c).jaxpr.pretty_print() for c in (short, long)]
    assert "f32[2,24,128]" in texts[0] and "f32[2,32,128]" not in texts[0]
    assert "f32[2,32,128]" in texts[1] and "f32[2,24,128]" not in texts[1]


# ----------------------------------------------------------------------------- one step (generation)


BACKENDS = ["reference", "xla", "pallas_gpu", "pallas_tpu"]


def _step_args(seed=7):
    args, _, _, _ = _case(2, 4, 9, 5, True, False, jnp.float32, seed=seed)
    resets = jnp.asarray([[False, True, False, True], [False, False, True, False]])  # row 0 resets at the 4th step
    return args, resets


def _call(args, resets, lo, hi, h0, backend):
    """The op on steps [lo, hi) from ``h0``: (y, h)."""
    cut = lambda v: v[:, lo:hi]  # noqa: E731
    return selective_scan(cut(args["x"]), cut(args["dt"]), args["A"], cut(args["B"]), cut(args["C"]), D=args["D"],
                          z=cut(args["z"]), dt_bias=args["dt_bias"], dt_softplus=True, h0=h0, resets=cut(resets),
                          return_state=True, backend=backend, interpret=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_equals_the_multi_step_call(backend):
    # generation: from the state after 3 steps (nonzero h0 before them), the 4th step as a
    # one-step call equals the same backend's 4-step call's last output and final state, in
    # the rows with and without a reset there; and it runs no kernel (no pallas_call)
    args, resets = _step_args()
    y4, h4 = _call(args, resets, 0, 4, args["h0"], backend)
    _, h3 = _call(args, resets, 0, 3, args["h0"], backend)
    y1, h1 = _call(args, resets, 3, 4, h3, backend)
    rtol, atol = TOL[jnp.float32]
    assert y1.shape == (2, 1, 9) and h1.shape == (2, 9, 5)
    np.testing.assert_allclose(np.asarray(y1[:, 0]), np.asarray(y4[:, 3]), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h4), rtol=rtol, atol=atol)
    jaxpr = str(jax.make_jaxpr(lambda h: _call(args, resets, 3, 4, h, backend))(h3))
    assert "pallas_call" not in jaxpr


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_gradients_equal_the_sequential_reference(backend):
    # the gradient of the closed form (plain jnp, differentiated by JAX) of every input,
    # through y and the final state, against reference.scan (lax.scan) on the same step;
    # row 0 resets at this step (its h0 gets no gradient), row 1 carries h0
    args, resets = _step_args(seed=9)
    one = {k: (v[:, 3:4] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
    r1 = resets[:, 3:4]
    rng = np.random.default_rng(2)
    w, wh = jnp.asarray(rng.standard_normal((2, 1, 9)), jnp.float32), jnp.asarray(rng.standard_normal((2, 9, 5)), jnp.float32)

    def loss(fn):
        def f(*vals):
            kw = dict(zip(NAMES, vals))
            y, h = fn(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"], dt_bias=kw["dt_bias"],
                      dt_softplus=True, h0=kw["h0"], resets=r1, return_state=True)
            return jnp.sum(y * w) + jnp.sum(h * wh)
        return f

    op = lambda *a, **k: selective_scan(*a, **k, backend=backend, interpret=True)  # noqa: E731
    seq = lambda *a, **k: reference.scan(*a, **k, chunk_size=None)  # noqa: E731
    vals = [one[k] for k in NAMES]
    got = jax.grad(loss(op), tuple(range(len(NAMES))))(*vals)
    want = jax.grad(loss(seq), tuple(range(len(NAMES))))(*vals)
    for k, g, r in zip(NAMES, got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6, err_msg=f"gradient of {k}")
    assert float(jnp.max(jnp.abs(got[NAMES.index("h0")][0]))) == 0.0  # the reset row's h0 is dropped
    assert float(jnp.max(jnp.abs(got[NAMES.index("h0")][1]))) > 0.0


# ----------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"bwd_layout": "channels"}, {"lanes_train_chunk": 8}],
                         ids=["defaults_lanes_backward", "channels_backward", "lanes_backward_train_chunk8"])
def test_pallas_gpu_selective_scan_on_the_gpu(options):
    # The real Mosaic GPU lowering with the default options (run with -m gpu on the
    # accelerator), float32: outputs, final state and every gradient equal the reference, at
    # odd lengths and channels, resets and h0 (the defaults: the lanes training kernels, with
    # the TMA reduce-add of dB/dC, which Mosaic GPU's interpreter lacks, so only this test runs
    # it); also the lanes training forward in 8-row tiles and the one-lane-per-channel
    # training kernels.
    args, resets, w, wh = _case(2, 203, 300, 16, True, True, jnp.float32, seed=3)
    rtol, atol = TOL[jnp.float32]
    y, h, g = _run("pallas_gpu", args, resets, w, wh, interpret=False, config=SelectiveScanConfig(**options))
    y_ref, h_ref, g_ref = _run("reference", args, resets, w, wh)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=rtol, atol=atol)
    for k in g_ref:
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g_ref[k]), rtol=rtol, atol=atol, err_msg=f"gradient of {k}")


def _rel(u, v) -> float:
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float(np.linalg.norm(u - v) / np.linalg.norm(v))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,gated,softplus,with_resets,dtype,options", LANES_CASES + [
    ((2, 203, 300, 16), True, True, True, jnp.float32, {}), ((2, 203, 300, 16), True, True, True, jnp.bfloat16, {})],
    ids=["f32_gated_resets", "bf16_state5_no_softplus", "state32_chunk4", "f32_large", "bf16_large"])
def test_pallas_gpu_lanes_forward_on_the_gpu(shape, gated, softplus, with_resets, dtype, options):
    # The lanes forward on the real lowering: outputs and final state against the float32
    # reference on the same inputs (bf16: within 5e-3 relative, the output's rounding).
    args, resets = _lanes_case(shape, gated, softplus, with_resets, dtype, seed=31)
    up = {k: (None if v is None else v.astype(jnp.float32)) for k, v in args.items()}
    y, h = _forward_only(args, resets, softplus, "pallas_gpu", interpret=False, config=SelectiveScanConfig(**options))
    y_ref, h_ref = _forward_only(up, resets, softplus, "reference")
    tol = 5e-3 if dtype == jnp.bfloat16 else 1e-5
    assert _rel(y, y_ref) <= tol and _rel(h, h_ref) <= tol, (_rel(y, y_ref), _rel(h, h_ref))


@pytest.mark.gpu
def test_pallas_gpu_selective_scan_bf16_on_the_gpu():
    # bf16 inputs on the real lowering. An elementwise 3e-3 match against the bf16 reference
    # is below one bf16 ulp (2^-8): on the first GPU run 14 of 121,800 dx elements were 2 ulps
    # from it, and the bf16 reference itself is as far from the float32 truth at those same
    # elements (it rounds inside). So both are measured against the float32 reference on the
    # same (bf16-valued) inputs: the kernel must be no less accurate than the bf16 reference
    # (relative norm error within 10% of it), and within 5e-3 of the truth.
    args, resets, w, wh = _case(2, 203, 300, 16, True, True, jnp.bfloat16, seed=3)
    up = {k: (None if v is None else v.astype(jnp.float32)) for k, v in args.items()}
    y, h, g = _run("pallas_gpu", args, resets, w, wh, interpret=False)
    y_bf, h_bf, g_bf = _run("reference", args, resets, w, wh)
    y_32, h_32, g_32 = _run("reference", up, resets, w, wh)
    pairs = [("y", y, y_bf, y_32), ("h", h, h_bf, h_32)] + [(k, g[k], g_bf[k], g_32[k]) for k in g_32]
    for name, ours, ref_bf, truth in pairs:
        err, ref_err = _rel(ours, truth), _rel(ref_bf, truth)
        assert err <= 1.1 * ref_err + 1e-4 and err <= 5e-3, (name, err, ref_err)
