"""The matrix-state ops ``gated_linear_attention`` and ``delta_rule``: every backend equals
the sequential reference (outputs, final state, gradients of every input) with resets,
an incoming state, lengths not a multiple of the chunk and extreme gates; the reference
equals a float64 numpy loop of the equations and closed forms; one-step and split calls
equal one call; bad input is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.kernels import chunked, delta_rule, gated_linear_attention
from mnemax.kernels.chunked_gpu import ChunkedConfig
from mnemax.kernels.delta_rule import BACKENDS as DELTA_BACKENDS
from mnemax.kernels.gated_linear_attention import BACKENDS as GLA_BACKENDS

GATES = ["none", "head", "channel"]
# the compiled backends runnable here; the Pallas ones run below in interpret mode
FAST = {"gla": [b for b in GLA_BACKENDS.available() if b not in ("reference", "pallas_gpu", "pallas_tpu")],
        "delta": [b for b in DELTA_BACKENDS.available() if b not in ("reference", "pallas_gpu", "pallas_tpu")]}


def make_inputs(rng, op, gate, *, batch=2, heads=2, time=37, d_k=8, d_v=12, extreme=False):
    """Random q, k, v (k unit-norm for the delta rule), beta in (0, 1), log decays
    ``-softplus(2 z)`` (with ``extreme``: some -1e3 and some exactly 0), a random incoming
    state, and resets at the start, in mid-chunk, twice in a row and at the last step."""
    q, k = rng.standard_normal((2, batch, heads, time, d_k))
    v = rng.standard_normal((batch, heads, time, d_v))
    if op == "delta":
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((batch, heads, time))))
    shape = {"none": None, "head": (batch, heads, time), "channel": (batch, heads, time, d_k)}[gate]
    g = None
    if shape is not None:
        g = -np.logaddexp(0.0, 2.0 * rng.standard_normal(shape))
        if extreme:
            flat = g.reshape(-1)
            flat[::5] = -1e3
            flat[2::7] = 0.0
    state = rng.standard_normal((batch, heads, d_k, d_v))
    resets = np.zeros((batch, time), bool)
    resets[0, [0, time // 4, time // 4 + 1]] = True
    resets[1, [time // 2, time - 1]] = True
    return dict(q=q, k=k, v=v, beta=beta, g=g, state=state, resets=resets)


def call(op, x, **kw):
    """The op on the inputs ``x`` (a dict from :func:`make_inputs`)."""
    if op == "gla":
        return gated_linear_attention(x["q"], x["k"], x["v"], x["g"], state=x["state"], resets=x["resets"], **kw)
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], state=x["state"], resets=x["resets"], **kw)


def numpy_loop(op, x, scale):
    """The recurrence in float64 Python loops, from the equations in the ops' docstrings."""
    q, k, v, beta, g, state, resets = (x[n] for n in ("q", "k", "v", "beta", "g", "state", "resets"))
    batch, heads, time, d_k = q.shape
    o = np.zeros(v.shape)
    final = np.zeros(state.shape)
    for b in range(batch):
        for h in range(heads):
            S = state[b, h].copy()
            for t in range(time):
                if resets[b, t]:
                    S = np.zeros_like(S)
                if g is not None:
                    a = np.exp(g[b, h, t])
                    S = (a[:, None] if np.ndim(a) else a) * S
                kt, vt = k[b, h, t], v[b, h, t]
                if op == "gla":
                    S = S + np.outer(kt, vt)
                else:
                    S = S + beta[b, h, t] * np.outer(kt, vt - S.T @ kt)
                o[b, h, t] = S.T @ (scale * q[b, h, t])
            final[b, h] = S
    return o, final


def max_err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))


def rel_err(got, want):
    """The largest error relative to the largest entry of ``want`` (at least 1)."""
    return max_err(got, want) / max(float(np.max(np.abs(np.asarray(want, np.float64)))), 1.0)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_reference_equals_a_numpy_loop_of_the_equations(op, gate):
    x = make_inputs(np.random.default_rng(0), op, gate, extreme=True)
    want_o, want_S = numpy_loop(op, x, scale=0.7)
    with jax.enable_x64(True):
        o, S = call(op, x, backend="reference", scale=0.7)
        assert o.dtype == jnp.float64 and S.dtype == jnp.float64
        assert max_err(o, want_o) < 1e-10 and max_err(S, want_S) < 1e-10


def test_gla_without_decay_is_causal_linear_attention():
    """The closed form: o = tril(scale Q K^T) V + scale Q S0 (no resets)."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 2, 50, 8))
    v, S0 = rng.standard_normal((1, 2, 50, 4)), rng.standard_normal((1, 2, 8, 4))
    want = np.einsum("bhts,bhsv->bhtv", np.tril(np.einsum("bhtd,bhsd->bhts", q, k)), v) + q @ S0
    want_S = S0 + np.einsum("bhtd,bhtv->bhdv", k, v)
    with jax.enable_x64(True):
        for backend in GLA_BACKENDS.available():
            o, S = gated_linear_attention(q, k, v, state=S0, scale=1.0, chunk_size=16, backend=backend)
            assert max_err(o, want) < 1e-10 and max_err(S, want_S) < 1e-10, backend


def test_delta_rule_with_orthonormal_keys_and_beta_one_stores_each_value():
    """The closed form: with orthonormal keys and beta = 1 each write replaces the value
    stored under its key, S k_i = v_i (the last write of k_i), whatever was there before."""
    rng = np.random.default_rng(2)
    d_k, d_v, time = 8, 5, 20
    basis = np.linalg.qr(rng.standard_normal((d_k, d_k)))[0]
    idx = rng.integers(0, d_k, time)
    k = basis[idx][None, None]
    v = rng.standard_normal((1, 1, time, d_v))
    S0 = rng.standard_normal((1, 1, d_k, d_v))
    with jax.enable_x64(True):
        for backend in DELTA_BACKENDS.available():
            _, S = delta_rule(k, k, v, np.ones((1, 1, time)), state=S0, chunk_size=8, backend=backend)
            for i in range(d_k):
                written = np.nonzero(idx == i)[0]
                want = v[0, 0, written[-1]] if len(written) else S0[0, 0].T @ basis[i]
                assert max_err(np.asarray(S[0, 0]).T @ basis[i], want) < 1e-10, (backend, i)


def grads(op, x, backend, chunk_size, dtype, **kw):
    """Outputs, final state and the gradients of a random projection of both with respect
    to every float input (q, k, v, beta for the delta rule, g, state)."""
    names = ["q", "k", "v"] + (["beta"] if op == "delta" else []) + (["g"] if x["g"] is not None else []) + ["state"]
    args = {n: jnp.asarray(x[n], dtype) for n in names}
    rng = np.random.default_rng(7)
    w_o = jnp.asarray(rng.standard_normal(x["v"].shape), jnp.float32)
    w_S = jnp.asarray(rng.standard_normal(x["state"].shape), jnp.float32)

    def loss(args):
        o, S = call(op, {**x, **args}, backend=backend, chunk_size=chunk_size, **kw)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(S.astype(jnp.float32) * w_S), (o, S)

    (_, (o, S)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return o, S, g


def backend_cases():
    return [(op, b) for op in ("gla", "delta") for b in FAST[op]]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("op,backend", backend_cases())
def test_backends_equal_the_reference_with_gradients(op, backend, gate):
    """float32: outputs and final state to 1e-4, gradients of every input to 1e-3 (both
    relative to the reference's largest entry), at chunk 16 with T = 37 (three chunks, the last
    partial), resets mid-chunk and twice in a row, extreme gates (-1e3 and 0)."""
    x = make_inputs(np.random.default_rng(3), op, gate, extreme=True)
    o_ref, S_ref, g_ref = grads(op, x, "reference", 16, jnp.float32)
    o, S, g = grads(op, x, backend, 16, jnp.float32)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert np.all(np.isfinite(np.asarray(g[name]))), name
        assert rel_err(g[name], g_ref[name]) < 1e-3, (name, rel_err(g[name], g_ref[name]))


@pytest.mark.parametrize("op,backend", backend_cases())
def test_bf16_inputs_match_the_reference(op, backend):
    """bf16 q, k, v (and gates): the state stays float32, the output is bf16; outputs to
    3e-3 of the reference on the same bf16 inputs, gradients to 5e-3 relative."""
    x = make_inputs(np.random.default_rng(4), op, "channel", time=40)
    o_ref, S_ref, g_ref = grads(op, x, "reference", 16, jnp.bfloat16)
    o, S, g = grads(op, x, backend, 16, jnp.bfloat16)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert rel_err(o, o_ref) < 3e-3 and rel_err(S, S_ref) < 3e-3, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 5e-3, (name, rel_err(g[name], g_ref[name]))


PALLAS_CASES = [(op, gate) for op in ("gla", "delta") for gate in GATES]
PALLAS_GATED = [(op, gate, b) for b in ("pallas_gpu", "pallas_tpu") for op, gate in PALLAS_CASES]


@pytest.mark.parametrize("op,gate,backend", PALLAS_GATED)
def test_pallas_equals_the_reference_with_gradients(op, gate, backend):
    """The Pallas GPU and TPU kernels (interpret mode), float32, the cases of
    ``test_backends_equal_the_reference_with_gradients``: three chunks of 16 (the last
    partial), resets mid-chunk, twice in a row and at the last step, an incoming state, extreme
    gates; head sizes 8 and 12 (zero-padded to 16 inside on GPU, as they are on TPU)."""
    x = make_inputs(np.random.default_rng(3), op, gate, extreme=True)
    o_ref, S_ref, g_ref = grads(op, x, "reference", 16, jnp.float32)
    o, S, g = grads(op, x, backend, 16, jnp.float32, interpret=True)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert np.all(np.isfinite(np.asarray(g[name]))), name
        assert rel_err(g[name], g_ref[name]) < 1e-3, (name, rel_err(g[name], g_ref[name]))


def rms_err(got, want):
    """||got - want|| / ||want|| (Frobenius, float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("op,gate,backend", [(op, gate, b) for op in ("gla", "delta") for gate in ("head", "channel")
                                            for b in ("pallas_gpu", "pallas_tpu")])
def test_pallas_bf16_inputs_match_the_reference(op, gate, backend):
    """bf16 inputs through the Pallas GPU and TPU kernels (interpret mode; one decay per head and
    per key channel; bf16 matmul operands and
    saved chunk states, float32 accumulation and carried state) against the float32
    reference on the same bf16-rounded inputs: outputs within 3e-3 and gradients within 5e-3
    in relative norm, the final state within 3e-3 of its largest entry. (A max-entry measure
    of a bf16 output is dominated by its own rounding: ``xla``'s is 3.6e-3 here.)"""
    x = make_inputs(np.random.default_rng(4), op, gate, time=40)
    rounded = {n: a if n == "resets" or a is None else np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
               for n, a in x.items()}
    o_ref, S_ref, g_ref = grads(op, rounded, "reference", 16, jnp.float32)
    o, S, g = grads(op, x, backend, 16, jnp.bfloat16, interpret=True)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert rms_err(o, o_ref) < 3e-3 and rel_err(S, S_ref) < 3e-3, (rms_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert rms_err(g[name], g_ref[name]) < 5e-3, (name, rms_err(g[name], g_ref[name]))


@pytest.mark.parametrize("op,backend", [(op, b) for op in ("gla", "delta") for b in ("pallas_gpu", "pallas_tpu")])
def test_pallas_per_channel_sub_chunks_and_key_blocks_equal_xla(op, backend):
    """Per-channel decays through several sub-chunks of 16 (chunk 32), extreme gates; on GPU key
    blocks (d_k 96, padded to 128) and value blocks (block_v 16), on TPU unpadded features (the
    TPU kernels ignore ``config``): the Pallas kernels (interpret mode) equal ``xla``'s
    chunkwise form, outputs, state and every gradient, to 1e-5 of the largest entry (both
    carry the same float32 rounding of the cumulative log decays, 4e-4 of the reference's
    gradients here for gla)."""
    x = make_inputs(np.random.default_rng(6), op, "channel", time=70, d_k=96, d_v=40, extreme=True)
    o_ref, S_ref, g_ref = grads(op, x, "xla", 32, jnp.float32)
    o, S, g = grads(op, x, backend, 32, jnp.float32, interpret=True, config=ChunkedConfig(block_v=16))
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-5, (name, rel_err(g[name], g_ref[name]))


@pytest.mark.parametrize("span_limit", [0.0, 60.0, 100.0])
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_pallas_gpu_factored_and_sub_chunked_scores_equal_the_reference(op, span_limit):
    """Per-channel decays on GPU: each chunk's intra-chunk scores are one factored matmul where
    its decay spans at most ``ChunkedConfig.span_limit`` nats, else the sub-chunked form. Gates
    whose chunks (of 32) span from ~10 to beyond 100 nats (one step of -150), so that at the
    default limit (60) both forms run in one call, at 0 only the sub-chunked one and at 100 the
    factored one wherever it is allowed (factors up to exp(50)): float32 outputs, state and
    every gradient equal the reference to 1e-4 / 1e-3 of its largest entries (interpret mode)."""
    x = make_inputs(np.random.default_rng(9), op, "channel", time=100, d_k=32, d_v=24)
    g = x["g"] * np.linspace(0.3, 3.0, 100)[:, None]  # later chunks decay faster
    g[1, 0, 10, 5] = -150.0
    x["g"] = g
    G = np.cumsum(np.pad(g, ((0, 0), (0, 0), (0, 28), (0, 0))).reshape(2, 2, 4, 32, 32), axis=3)
    spans = (G.max(axis=3) - G.min(axis=3)).max(axis=-1)  # (batch, heads, chunks), key block = d_k
    assert spans.min() < 60 < spans.max() and (spans > 100).any(), spans
    o_ref, S_ref, g_ref = grads(op, x, "reference", 32, jnp.float32)
    o, S, g = grads(op, x, "pallas_gpu", 32, jnp.float32, interpret=True, config=ChunkedConfig(span_limit=span_limit))
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert np.all(np.isfinite(np.asarray(g[name]))), name
        assert rel_err(g[name], g_ref[name]) < 1e-3, (name, rel_err(g[name], g_ref[name]))


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_pallas_tpu_factored_and_sub_chunked_scores_equal_xla(op, strong):
    """Per-channel decays on TPU: where every chunk of a call spans at most ``SPAN_LIMIT`` (60)
    nats, the kernels form the intra-chunk scores (and KDA's key-key scores) as one factored
    matmul, chosen by one ``lax.cond`` outside them; else in sub-chunks. Gates whose chunks of
    32 span ~10 to ~50 nats (the factored form), or the same with one step of -400 (``strong``:
    the sub-chunked form): float32 outputs, state and every gradient equal ``xla``'s chunkwise
    form at the same chunk to 1e-5 of the largest entry (interpret mode)."""
    x = make_inputs(np.random.default_rng(9), op, "channel", time=100, d_k=32, d_v=24)
    g = x["g"] * np.linspace(0.3, 1.2, 100)[:, None]  # later chunks decay faster
    if strong:  # factors of exp(+-200): the factored form would overflow
        g[1, 0, 10, 5] = -400.0
    x["g"] = g
    G = np.cumsum(np.pad(g, ((0, 0), (0, 0), (0, 28), (0, 0))).reshape(2, 2, 4, 32, 32), axis=3)
    spans = (G.max(axis=3) - G.min(axis=3)).max(axis=-1)  # (batch, heads, chunks)
    assert 20 < spans.max() and (spans.max() > 60) == strong, spans
    o_ref, S_ref, g_ref = grads(op, x, "xla", 32, jnp.float32)
    o, S, g = grads(op, x, "pallas_tpu", 32, jnp.float32, interpret=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-5, (name, rel_err(g[name], g_ref[name]))


# the bf16 cases are -m slow (7-14 s each on CI): the float32 cases hold the same two kernel sets
# bit for bit, and test_pallas_bf16_inputs_match_the_reference the per-channel kernels in bf16
@pytest.mark.parametrize("op,dtype", [("gla", jnp.float32), pytest.param("gla", jnp.bfloat16, marks=pytest.mark.slow),
                                      ("delta", jnp.float32), pytest.param("delta", jnp.bfloat16, marks=pytest.mark.slow)])
def test_pallas_gpu_factored_only_kernels_equal_the_per_chunk_choice(op, dtype):
    """Per-channel decays on GPU whose every chunk spans less than the limit (here 5-26 nats per
    chunk of 32): with ``ChunkedConfig.form_per_call`` (the default) one ``lax.cond`` outside the
    kernels runs the kernels holding the factored form only; without it the kernels holding both
    forms test each chunk and key block and take the factored form there too. The two give the
    same outputs, state and gradients of every input bit for bit (interpret mode, float32 and
    bf16 inputs), and equal the reference."""
    x = make_inputs(np.random.default_rng(10), op, "channel", time=100, d_k=64, d_v=24)
    x["g"] = x["g"] * 0.5
    G = np.cumsum(np.pad(x["g"], ((0, 0), (0, 0), (0, 28), (0, 0))).reshape(2, 2, 4, 32, 64), axis=3)
    spans = (G.max(axis=3) - G.min(axis=3)).max(axis=-1)
    assert 1 < spans.min() and spans.max() < chunked.SPAN_LIMIT, spans
    per_call = grads(op, x, "pallas_gpu", 32, dtype, interpret=True, config=ChunkedConfig())
    per_chunk = grads(op, x, "pallas_gpu", 32, dtype, interpret=True, config=ChunkedConfig(form_per_call=False))
    for a, b in zip(jax.tree.leaves(per_call), jax.tree.leaves(per_chunk)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    if dtype == jnp.float32:
        o_ref, S_ref, g_ref = grads(op, x, "reference", 32, jnp.float32)
        o, S, g = per_call
        assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4, (rel_err(o, o_ref), rel_err(S, S_ref))
        for name in g_ref:
            assert rel_err(g[name], g_ref[name]) < 1e-3, (name, rel_err(g[name], g_ref[name]))


@pytest.mark.parametrize("limit,per_call,strong,form", [(60.0, True, False, "factored"), (60.0, True, True, 60.0),
                                                        (60.0, False, False, 60.0), (0.0, True, False, 0.0)])
def test_pallas_gpu_form_per_call_picks_the_factored_kernels_only_where_every_chunk_fits(limit, per_call, strong, form):
    """``gated_linear_attention.gpu.by_span`` runs the factored-only kernels (``FACTORED``) when
    every chunk of G spans at most ``span_limit`` (here 24 nats), the kernels choosing per chunk
    (the limit) when one chunk spans more (one step of -80) or ``form_per_call`` is off, and the
    sub-chunked ones at a limit of 0. The cumulative decays and chunk ranges come from
    ``chunk_decays`` (a Pallas kernel, interpret mode), equal to numpy's cumulative sums per
    chunk and their ranges."""
    from mnemax.kernels.gated_linear_attention import gpu

    g = -np.full((2, 128, 16), 0.75, np.float32)  # (BH, Tp, d_k), chunks of 32: 23.25 nats each
    g[:, :, 8:] = np.random.default_rng(3).uniform(-0.5, 0.5, (2, 128, 8))  # channels that rise and fall
    if strong:
        g[1, 70, 3] = -80.0
    G_np = np.cumsum(g.reshape(2, 4, 32, 16).astype(np.float64), axis=2)
    G, ranges = gpu.chunk_decays(jnp.asarray(g, jnp.bfloat16 if strong else jnp.float32), 32, interpret=True)
    if not strong:  # (bf16 g rounds -0.75 exactly, the uniform channels not)
        np.testing.assert_allclose(np.asarray(G), G_np.reshape(2, 128, 16), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ranges), G_np.max(axis=2) - G_np.min(axis=2), rtol=1e-6, atol=1e-5)
    assert G.dtype == ranges.dtype == jnp.float32 and ranges.shape == (2, 4, 16)
    config = ChunkedConfig(span_limit=limit, form_per_call=per_call)
    picked = jax.jit(lambda r: gpu.by_span(gpu.fits_span(r, config), config,
                                           lambda span: jnp.float32(-1.0 if span == gpu.FACTORED else span)))(ranges)
    assert float(picked) == (-1.0 if form == "factored" else form)


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_xla_factored_and_sub_chunked_scores_equal_the_reference(op, strong):
    """Per-channel decays in ``xla``: the scores are one factored matmul per chunk when no
    chunk's decay spans more than ``chunked.SPAN_LIMIT`` nats (60), else sub-chunked for the
    whole call (``strong``: one step of -150), each with its own VJP (a custom one choosing
    as the forward did): float32 outputs, state and every gradient equal the reference to
    1e-4 / 1e-3 of its largest entries, at chunk 32 with resets and an incoming state."""
    x = make_inputs(np.random.default_rng(9), op, "channel", time=100, d_k=32, d_v=24)
    g = x["g"] * np.linspace(0.3, 1.2, 100)[:, None]
    if strong:
        g[1, 0, 10, 5] = -150.0
    x["g"] = g
    G = np.cumsum(np.pad(g, ((0, 0), (0, 0), (0, 28), (0, 0))).reshape(2, 2, 4, 32, 32), axis=3)
    spans = (G.max(axis=3) - G.min(axis=3)).max()
    assert (spans > chunked.SPAN_LIMIT) == strong and spans > 20, spans
    o_ref, S_ref, g_ref = grads(op, x, "reference", 32, jnp.float32)
    o, S, g = grads(op, x, "xla", 32, jnp.float32)
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert np.all(np.isfinite(np.asarray(g[name]))), name
        assert rel_err(g[name], g_ref[name]) < 1e-3, (name, rel_err(g[name], g_ref[name]))


# the non-default row blocks are -m slow (7-8 s each on CI): the same block forward substitution
# runs in the default cases, with two row blocks per chunk (per channel) and four (per head)
@pytest.mark.parametrize("gate,wy_block,rows", [("none", None, 16), ("head", None, 16),
                                               pytest.param("head", 32, 32, marks=pytest.mark.slow),
                                               ("channel", None, 32),
                                               pytest.param("channel", 16, 16, marks=pytest.mark.slow)])
def test_pallas_gpu_wy_blocks_equal_the_reference(monkeypatch, gate, wy_block, rows):
    """The delta rule's WY/UT preparation on GPU by block forward substitution (chunk 64 in row
    blocks of 16 or 32, by default 16 for no decay or one per head and 32 per channel; the
    other tests' chunks of 16 or 32 are mostly one block): float32, three chunks (the last
    partial), resets inside and across blocks, extreme gates (per channel: chunks beyond the
    span limit take the doubling product over the whole chunk, the others the blocks), an
    incoming state, in interpret mode. Outputs, state and every gradient equal ``xla``'s
    chunkwise form at the same chunk to 1e-5 of the largest entry: both carry the float32
    rounding of cumulative log decays summed over 64 steps with -1e3 among them, 1.5e-4 of
    the reference's outputs here."""
    from mnemax.kernels.delta_rule import gpu, gpu_channel

    kernel = gpu_channel if gate == "channel" else gpu
    seen, real = [], kernel._wy_kernel
    monkeypatch.setattr(kernel, "_wy_kernel", lambda *a, **k: seen.append(k["b"]) or real(*a, **k))
    x = make_inputs(np.random.default_rng(8), "delta", gate, time=150, extreme=True)
    o_ref, S_ref, g_ref = grads("delta", x, "xla", 64, jnp.float32)
    o, S, g = grads("delta", x, "pallas_gpu", 64, jnp.float32, interpret=True, config=ChunkedConfig(wy_block=wy_block))
    assert seen and set(seen) == {rows}, seen
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-5, (name, rel_err(g[name], g_ref[name]))


# the bf16 case (bf16 keeps chunk 64, as the float32 case's chunk_for asserts) is -m slow
@pytest.mark.parametrize("dtype,chunk", [(jnp.float32, 32), pytest.param(jnp.bfloat16, 64, marks=pytest.mark.slow)])
def test_pallas_gpu_delta_rule_runs_float32_at_large_d_k_in_smaller_chunks(monkeypatch, dtype, chunk):
    """The delta rule's no-decay / scalar-decay GPU kernels run float32 inputs at chunk x d_k
    <= 64 x 64 (the gradient kernel at chunk 64, d_k 128 asked an H100 for 256 KiB of shared
    memory; at chunk 32 it compiled): asked for chunk 64 at d_k 100 (padded to 128), the
    kernels' problem has chunks of 32 in float32 and 64 in bfloat16, and the outputs, state
    and every gradient still equal ``xla``'s (interpret mode; 1e-5 and bf16's 3e-2 of the
    largest entry). The rule: chunk_for(64, float32, d_k) is 64, 32, 16 at d_k 64, 128, 256."""
    from mnemax.kernels import chunked_gpu
    from mnemax.kernels.delta_rule import gpu

    assert [gpu.chunk_for(64, jnp.float32, d) for d in (64, 100, 256)] == [64, 32, 16]
    assert gpu.chunk_for(64, jnp.bfloat16, 256) == 64 and gpu.chunk_for(16, jnp.float32, 128) == 16
    seen = []
    make_problem = chunked_gpu.make_problem

    def spy(*args):
        p = make_problem(*args)
        seen.append(p.L)
        return p

    monkeypatch.setattr(chunked_gpu, "make_problem", spy)
    x = make_inputs(np.random.default_rng(12), "delta", "head", batch=2, heads=1, time=70, d_k=100, d_v=16)
    o_ref, S_ref, g_ref = grads("delta", x, "xla", 64, jnp.float32)
    o, S, g = grads("delta", x, "pallas_gpu", 64, dtype, interpret=True)
    assert seen and set(seen) == {chunk}, seen
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert rel_err(o, o_ref) < tol and rel_err(S, S_ref) < tol, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < tol, (name, rel_err(g[name], g_ref[name]))


def test_chunked_config_value_block_rule():
    """``block_v`` None: 64 value columns per block (at most d_v), or for the scalar-decay linear
    attention's kernels (``split``) two blocks of d_v / 2 from 16 to 64; a set ``block_v`` wins."""
    c = ChunkedConfig()
    assert [c.value_block(d) for d in (16, 32, 64, 128, 256)] == [16, 32, 64, 64, 64]
    assert [c.value_block(d, split=True) for d in (16, 32, 64, 128, 256)] == [16, 16, 32, 64, 64]
    assert ChunkedConfig(block_v=128).value_block(64, split=True) == 64
    assert ChunkedConfig(block_v=16).value_block(128) == 16


def test_chunked_config_heads_per_program_rule():
    """``group_heads``: the largest divisor of the value heads per q/k head up to it
    (mamba2-130m's 24 in one group: 8 of 8, 12 of 16, all 24 of 24 or more; 2 heads per group
    cap 8 at 2; a prime count 7 with 4: one head per program)."""
    assert [ChunkedConfig(group_heads=n).heads_per_program(24) for n in (1, 2, 5, 8, 16, 24, 64)] == [1, 2, 4, 8, 12,
                                                                                                       24, 24]
    assert ChunkedConfig(group_heads=8).heads_per_program(2) == 2
    assert ChunkedConfig(group_heads=8).heads_per_program(1) == 1
    assert ChunkedConfig(group_heads=4).heads_per_program(7) == 1


@pytest.mark.parametrize("gate", ["none", "head"])
def test_pallas_gpu_linear_attention_two_value_blocks_by_default(gate):
    """At d_v 40 (padded to 64) the scalar-decay linear attention's default config loops over
    two value blocks of 32, ``block_v=64`` over one: in interpret mode, float32, both equal
    ``xla``'s chunkwise form (outputs, state, every gradient) to 1e-5 of the largest entry, and
    each other to 1e-6 (dq and dk sum the blocks' terms in another order)."""
    x = make_inputs(np.random.default_rng(9), "gla", gate, time=70, d_k=24, d_v=40)
    o_ref, S_ref, g_ref = grads("gla", x, "xla", 32, jnp.float32)
    runs = [grads("gla", x, "pallas_gpu", 32, jnp.float32, interpret=True, config=c)
            for c in (ChunkedConfig(), ChunkedConfig(block_v=64))]
    for o, S, g in runs:
        assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5, (rel_err(o, o_ref), rel_err(S, S_ref))
        for name in g_ref:
            assert rel_err(g[name], g_ref[name]) < 1e-5, (name, rel_err(g[name], g_ref[name]))
    (o2, S2, g2), (o1, S1, g1) = runs
    assert rel_err(o2, o1) < 1e-6 and rel_err(S2, S1) < 1e-6
    for name in g1:
        assert rel_err(g2[name], g1[name]) < 1e-6, (name, rel_err(g2[name], g1[name]))


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_pallas_refuses_bad_configs(op):
    """``config=`` takes a ChunkedConfig, whose fields are checked."""
    x = make_inputs(np.random.default_rng(5), op, "head", time=8)
    with pytest.raises(TypeError, match="config must be a ChunkedConfig"):
        call(op, x, backend="pallas_gpu", interpret=True, config={"block_v": 32})
    with pytest.raises(ValueError, match="ChunkedConfig.block_v"):
        ChunkedConfig(block_v=24)
    with pytest.raises(ValueError, match="ChunkedConfig.wy_block"):
        ChunkedConfig(wy_block=8)
    with pytest.raises(ValueError, match="ChunkedConfig.f32_passes"):
        ChunkedConfig(f32_passes=2)
    with pytest.raises(ValueError, match="ChunkedConfig.span_limit"):
        ChunkedConfig(span_limit=120.0)
    with pytest.raises(ValueError, match="ChunkedConfig.group_heads: got 0"):
        ChunkedConfig(group_heads=0)


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_one_step_and_split_calls_equal_one_call(op):
    """Token by token (the closed-form one-step path) and in two calls split mid-chunk,
    with the state carried, equal one call over the whole sequence."""
    x = make_inputs(np.random.default_rng(5), op, "channel", time=21)
    whole_o, whole_S = call(op, x, chunk_size=8)
    sl = lambda lo, hi: {**{n: (None if x[n] is None else x[n][:, :, lo:hi]) for n in ("q", "k", "v", "beta", "g")},  # noqa: E731
                         "resets": x["resets"][:, lo:hi]}
    S, outs = x["state"], []
    for t in range(21):
        o, S = call(op, {**sl(t, t + 1), "state": S}, chunk_size=8)
        outs.append(o)
    assert max_err(jnp.concatenate(outs, axis=2), whole_o) < 1e-5 and max_err(S, whole_S) < 1e-5
    o1, S1 = call(op, {**sl(0, 11), "state": x["state"]}, chunk_size=8)
    o2, S2 = call(op, {**sl(11, 21), "state": S1}, chunk_size=8)
    assert max_err(jnp.concatenate([o1, o2], axis=2), whole_o) < 1e-5 and max_err(S2, whole_S) < 1e-5


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_a_reset_makes_the_state_that_of_a_fresh_sequence(op):
    """After a reset at step r the outputs equal those of the sequence started at r from
    the zero state, whatever came before."""
    x = make_inputs(np.random.default_rng(6), op, "head", time=30)
    x["resets"][:] = False
    x["resets"][:, 13] = True
    o, S = call(op, x, chunk_size=8)
    tail = {**{n: x[n][:, :, 13:] for n in ("q", "k", "v", "beta", "g")}, "state": None, "resets": None}
    o_fresh, S_fresh = call(op, tail, chunk_size=8)
    assert max_err(o[:, :, 13:], o_fresh) < 1e-5 and max_err(S, S_fresh) < 1e-5


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_bad_inputs_are_refused_by_name(op):
    x = make_inputs(np.random.default_rng(0), op, "head", time=6)
    cases = [
        ("q", x["q"][0], ValueError), ("k", x["k"][..., :3], ValueError), ("v", x["v"][:, :, :4], ValueError),
        ("g", x["g"][..., None], ValueError), ("state", x["state"][..., :2], ValueError),
        ("resets", x["resets"].astype(np.float32), TypeError), ("q", x["q"].astype(np.int32), TypeError),
    ]
    if op == "delta":
        cases.append(("beta", x["beta"][:, :, :2], ValueError))
    for name, bad, err in cases:
        with pytest.raises(err, match=name):
            call(op, {**x, name: bad})
    with pytest.raises(ValueError, match="chunk_size"):
        call(op, x, chunk_size=0)
    with pytest.raises(TypeError, match="scale"):
        call(op, x, scale="0.5")
    with pytest.raises(ValueError, match="backend"):
        call(op, x, backend="triton")


FLA = np.load(__import__("pathlib").Path(__file__).parent / "fixtures" / "fla_naive.npz")


def fla_case(case):
    """A case of ``fixtures/fla_naive.npz`` (fla-core 0.6.0's naive recurrences, written by
    ``fixtures/make_fla_naive_fixtures.py``) in the ops' (B, H, T, D) layout."""
    import json

    layout = json.loads(str(FLA[f"{case}/layout"]))
    out = {}
    for name, lay in layout.items():
        a = FLA[f"{case}/{name}"]
        out[name] = np.moveaxis(a, 1, 2) if lay.startswith("B T H") else a
    return out, float(FLA[f"{case}/scale"])


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("case", ["simple_gla", "gla", "delta_rule", "gdn", "kda"])
def test_ops_equal_fla_naive_recurrences(case, backend):
    """fla's simple_gla / gla (linear attention, decay per head / per key channel), delta
    rule, gated delta rule and KDA naive recurrences (T = 37, gates down to -21 and
    exactly 0, a random incoming state), float32: outputs and final state to 1e-5."""
    x, scale = fla_case(case)
    g = x.get("g", x.get("gk"))
    if case in ("simple_gla", "gla"):
        o, S = gated_linear_attention(x["q"], x["k"], x["v"], g, state=x["h0"], scale=scale, chunk_size=16,
                                      backend=backend)
    else:
        o, S = delta_rule(x["q"], x["k"], x["v"], x["beta"], g, state=x["h0"], scale=scale, chunk_size=16,
                          backend=backend)
    assert rel_err(o, x["o"]) < 1e-5 and rel_err(S, x["state"]) < 1e-5, (rel_err(o, x["o"]), rel_err(S, x["state"]))
