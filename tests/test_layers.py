"""Shared layers: each equals an independent numpy formula, and each passes the contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers import MLP, CausalConv1d, CausalSelfAttention, LayerNorm, RMSNorm, TransformerBlock

from .contract import check_layer_contract


def float_input(features):
    def make(rng, batch, time):
        return jnp.asarray(rng.standard_normal((batch, time, features)), jnp.float32)

    return make


# ----------------------------------------------------------------------------- norms


def test_norms_match_formulas():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3 + 1
    xn = np.asarray(x, np.float64)
    rms = RMSNorm()
    v = rms.init(jax.random.key(1), x)
    v = jax.tree.map(lambda p: p * 1.5, v)
    y, st = rms.apply(v, x)
    want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * 1.5
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    assert st == ()
    ln = LayerNorm()
    v = ln.init(jax.random.key(1), x)
    y, _ = ln.apply(v, x)
    mu, var = xn.mean(-1, keepdims=True), xn.var(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y), (xn - mu) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_norms_with_random_scale_and_bias_match_formulas(cls):
    """Away from the initial scale 1 and bias 0: a per-feature scale and bias, a non-default eps."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 8)) * 3 + 1, jnp.float32)
    scale, bias = rng.standard_normal(8) + 1.0, rng.standard_normal(8)
    layer = cls(eps=0.5)
    params = {"scale": jnp.asarray(scale, jnp.float32)}
    if cls is LayerNorm:
        params["bias"] = jnp.asarray(bias, jnp.float32)
    assert sorted(layer.init(jax.random.key(0), x)["params"]) == sorted(params)
    y, _ = layer.apply({"params": params}, x)
    xn = np.asarray(x, np.float64)
    if cls is LayerNorm:
        mu, var = xn.mean(-1, keepdims=True), ((xn - xn.mean(-1, keepdims=True)) ** 2).mean(-1, keepdims=True)
        want = (xn - mu) / np.sqrt(var + 0.5) * scale + bias
    else:
        want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 0.5) * scale
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_norm_contract(cls):
    check_layer_contract(lambda **kw: cls(**kw), float_input(6), time=9)


# ----------------------------------------------------------------------------- conv


def test_conv_matches_numpy_convolution():
    batch, time, c, w = 2, 9, 3, 4
    x = jax.random.normal(jax.random.key(0), (batch, time, c))
    conv = CausalConv1d(features=c, width=w)
    v = conv.init(jax.random.key(1), x)
    y, state = conv.apply(v, x)
    kern = np.asarray(v["params"]["kernel"].value if hasattr(v["params"]["kernel"], "value") else v["params"]["kernel"])
    bias = np.asarray(jax.tree.leaves(v["params"]["bias"])[0])
    xn = np.asarray(x, np.float64)
    want = np.zeros_like(xn)
    for b in range(batch):
        for ch in range(c):
            # causal: y_t = sum_k kern[k] x_{t-(w-1)+k}  == full convolution with the flipped kernel
            want[b, :, ch] = np.convolve(xn[b, :, ch], kern[::-1, ch], mode="full")[:time] + bias[ch]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.inputs), xn[:, -(w - 1) :], rtol=1e-6)


def test_conv_contract():
    check_layer_contract(lambda **kw: CausalConv1d(features=5, width=4, **kw), float_input(5))


# ----------------------------------------------------------------------------- mlp


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu"])
def test_mlp_matches_formula(kind):
    x = jax.random.normal(jax.random.key(0), (2, 3, 6))
    mlp = MLP(hidden=10, kind=kind)
    v = mlp.init(jax.random.key(1), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn_unbox(v["params"]))
    xn = np.asarray(x, np.float64)
    gelu = lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))  # noqa: E731
    silu = lambda u: u / (1 + np.exp(-u))  # noqa: E731
    up = xn @ p["up"]["kernel"]
    if kind == "gelu":
        h = gelu(up)
    else:
        g = xn @ p["gate"]["kernel"]
        h = (silu(g) if kind == "swiglu" else gelu(g)) * up
    y, _ = mlp.apply(v, x)
    np.testing.assert_allclose(np.asarray(y), h @ p["down"]["kernel"], rtol=1e-5, atol=1e-5)


def test_mlp_contract():
    check_layer_contract(lambda **kw: MLP(hidden=12, **kw), float_input(6), time=9)


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


# ----------------------------------------------------------------------------- attention


def numpy_attention(x, p, num_heads, num_kv_heads, window, resets=None, base=10000.0):
    """Causal sliding-window attention with RoPE (and the optional key-path conv),
    written with plain numpy loops."""
    x = np.asarray(x, np.float64)
    batch, time, _ = x.shape
    q = np.einsum("btf,fhd->bthd", x, p["query"]["kernel"])
    xk = x
    if "key_conv" in p:
        w, bias = p["key_conv"]["kernel"], p["key_conv"]["bias"]
        xk = np.zeros_like(x)
        for b in range(batch):
            for t in range(time):
                start = max([s for s in range(t + 1) if resets is not None and resets[b, s]] or [0])
                acc = bias.copy()
                for j in range(w.shape[0]):
                    src = t - (w.shape[0] - 1) + j
                    if src >= start:
                        acc = acc + w[j] * x[b, src]
                xk[b, t] = acc
    k = np.einsum("btf,fhd->bthd", xk, p["key"]["kernel"])
    v = np.einsum("btf,fhd->bthd", x, p["value"]["kernel"])
    hd = q.shape[-1]
    out = np.zeros((batch, time, num_heads, hd))
    for b in range(batch):
        start = 0
        rel = np.zeros(time)
        starts = np.zeros(time, int)
        for t in range(time):
            if resets is not None and resets[b, t]:
                start = t
            starts[t] = start
            rel[t] = t - start
        inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)

        def rot(u, pos):
            a = pos * inv
            u1, u2 = u[: hd // 2], u[hd // 2 :]
            return np.concatenate([u1 * np.cos(a) - u2 * np.sin(a), u2 * np.cos(a) + u1 * np.sin(a)])

        for t in range(time):
            for h in range(num_heads):
                kh = h // (num_heads // num_kv_heads)
                qv = rot(q[b, t, h], rel[t])
                keys = [s for s in range(time) if starts[t] <= s <= t and t - s < window]
                logits = np.array([qv @ rot(k[b, s, kh], rel[s]) for s in keys]) / np.sqrt(hd)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[b, t, h] = sum(wi * v[b, s, kh] for wi, s in zip(w, keys))
    return np.einsum("bthd,hdf->btf", out, p["out"]["kernel"])


@pytest.mark.parametrize("heads,kv_heads,window,key_conv", [(2, 2, 64, 0), (4, 2, 5, 0), (2, 1, 64, 3)])
def test_attention_matches_numpy(heads, kv_heads, window, key_conv):
    batch, time, f = 2, 11, 16
    x = jax.random.normal(jax.random.key(0), (batch, time, f))
    resets = jnp.zeros((batch, time), bool).at[1, 6].set(True)
    layer = CausalSelfAttention(features=f, num_heads=heads, num_kv_heads=kv_heads, window=window, key_conv=key_conv)
    v = layer.init(jax.random.key(1), x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn_unbox(v["params"]))
    y, _ = layer.apply(v, x, None, resets)
    want = numpy_attention(x, p, heads, kv_heads, window, np.asarray(resets))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


# the full-context case without a key conv is also the transformer block's and LM's
# attention (window 16 > the contract's 11 steps), so its own contract runs with -m slow
@pytest.mark.parametrize("window,key_conv", [pytest.param(64, 0, marks=pytest.mark.slow), (4, 0), (64, 3)])
def test_attention_contract(window, key_conv):
    check_layer_contract(
        lambda **kw: CausalSelfAttention(features=8, num_heads=2, num_kv_heads=1, window=window, key_conv=key_conv, **kw),
        float_input(8),
    )


# The Transformer LM's contract (tests/test_models.py, in CI) runs these blocks (window 16)
# inside the LM; the block's own contract runs with -m slow (CI time).
@pytest.mark.slow
def test_transformer_block_contract():
    check_layer_contract(lambda **kw: TransformerBlock(features=8, num_heads=2, window=16, **kw), float_input(8))


def test_attention_config_errors():
    x = jnp.ones((1, 3, 8))
    with pytest.raises(ValueError, match="num_heads"):
        CausalSelfAttention(features=8, num_heads=3, num_kv_heads=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="features"):
        CausalSelfAttention(features=9, num_heads=2).init(jax.random.key(0), jnp.ones((1, 3, 9)))
    with pytest.raises(ValueError, match="window"):
        CausalSelfAttention(features=8, num_heads=2, window=0).init(jax.random.key(0), x)
