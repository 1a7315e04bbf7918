"""Grouped q/k heads of both matrix-state ops (``gated_linear_attention``, ``delta_rule``): q and k
with a divisor of v's heads (Mamba-2's groups of B and C, Qwen3-Next's Gated DeltaNet) equal the
reference on q and k repeated over the heads, per backend and per shard under a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .test_linear_attention_ops import call, make_inputs, max_err, rel_err


@pytest.mark.parametrize("op,backend,gate,groups,group_heads", [
    ("gla", "reference", "head", 2, 1), ("gla", "xla", "channel", 2, 1), ("gla", "pallas_gpu", "none", 1, 1),
    ("gla", "pallas_gpu", "head", 2, 1), ("gla", "pallas_gpu", "channel", 2, 1), ("gla", "pallas_tpu", "head", 1, 1),
    ("gla", "pallas_gpu", "head", 1, 4), ("gla", "pallas_gpu", "none", 2, 8), ("gla", "pallas_gpu", "head", 1, 3),
    ("delta", "xla", "channel", 2, 1), ("delta", "pallas_gpu", "none", 1, 1), ("delta", "pallas_gpu", "head", 2, 4)])
def test_grouped_query_key_heads_equal_repeated_heads(op, backend, gate, groups, group_heads):
    """q and k with ``groups`` heads serving 4 value heads (Mamba-2's n_groups of B and C;
    Qwen3-Next's Gated DeltaNet with more value heads than key heads): the outputs, final state
    and gradients (dq and dk summed over each group's value heads) equal the reference on q and
    k repeated over the heads, to 1e-4 / 1e-3 as for ungrouped calls; float32, three chunks of
    16, resets and an incoming state. The ``pallas_gpu`` kernels for no decay or one per head
    read each group in place (interpret mode); the others repeat. With ``group_heads`` > 1
    (``ChunkedConfig.group_heads``) the scalar-decay linear attention's per-chunk kernels run
    several value heads per program, summing their dq and dk in the kernel: all 4 of one group
    (4); 2 (8, capped by 2 groups of 2); with 3, 6 value heads in one group, 3 per program,
    two programs per group for the op to sum. The delta rule ignores it. A wrong group count
    fails: it would pair a value head with another head's q and k."""
    from mnemax.kernels.chunked_gpu import ChunkedConfig

    config = ChunkedConfig(group_heads=group_heads) if group_heads > 1 else None
    heads = 6 if group_heads == 3 else 4
    x = make_inputs(np.random.default_rng(11), op, gate, heads=heads, extreme=True)
    x["q"], x["k"] = x["q"][:, :groups], x["k"][:, :groups]
    repeat = lambda a: jnp.repeat(a, heads // groups, axis=1)  # noqa: E731
    names = ["q", "k", "v"] + (["beta"] if op == "delta" else []) + (["g"] if x["g"] is not None else []) + ["state"]
    rng = np.random.default_rng(7)
    w_o, w_S = (jnp.asarray(rng.standard_normal(x[n].shape), jnp.float32) for n in ("v", "state"))

    def loss(args, grouped, backend, **kw):
        a = {**x, **args}
        if not grouped:
            a = {**a, "q": repeat(a["q"]), "k": repeat(a["k"])}
        o, S = call(op, a, backend=backend, chunk_size=16, **kw)
        return jnp.sum(o * w_o) + jnp.sum(S * w_S), (o, S)

    args = {n: jnp.asarray(x[n], jnp.float32) for n in names}
    (_, (o_ref, S_ref)), g_ref = jax.value_and_grad(loss, has_aux=True)(args, False, "reference")
    kw = {"interpret": True, "config": config} if backend.startswith("pallas") else {}
    (_, (o, S)), g = jax.value_and_grad(loss, has_aux=True)(args, True, backend, **kw)
    assert o.shape == x["v"].shape and g["q"].shape == x["q"].shape
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-3, (name, rel_err(g[name], g_ref[name]))
    step = {**x, **{n: None if x[n] is None else x[n][:, :, :1] for n in ("q", "k", "v", "g", "beta")},
            "resets": None}
    o1, S1 = call(op, step, backend=backend, **kw)  # the one-step path
    o1_ref, S1_ref = call(op, {**step, "q": repeat(step["q"]), "k": repeat(step["k"])}, backend="reference")
    assert max_err(o1, o1_ref) < 1e-5 and max_err(S1, S1_ref) < 1e-5
    with pytest.raises(ValueError, match="q must have as many heads as v"):
        bad = 4 if heads == 6 else 3  # q/k heads that do not divide v's
        call(op, {**x, "q": x["v"][:, :bad, :, :8], "k": x["v"][:, :bad, :, :8]}, backend=backend, **kw)
    with pytest.raises(ValueError, match="k must have q's shape"):
        call(op, {**x, "k": repeat(x["k"])[:, :3] if groups == 1 else repeat(x["k"])}, backend=backend, **kw)


@pytest.mark.parametrize("op,groups,group_heads", [("gla", 1, 1), ("gla", 2, 1), ("gla", 2, 2), ("delta", 1, 1),
                                                    ("delta", 2, 1)])
def test_grouped_heads_per_shard_equal_the_reference(op, groups, group_heads):
    """Under a (rows 4, cols 2) mesh of the simulated CPU devices with the heads split over
    ``cols``: 2 q/k groups split with the 4 value heads (each shard reads its own group in
    place; with ``group_heads=2`` one program runs both heads of its shard's group), 1 group
    does not split and is repeated first; the ``pallas_gpu`` kernels (interpret) per shard
    equal the unsharded reference in outputs, state and every gradient."""
    from mnemax.kernels.chunked_gpu import ChunkedConfig
    from mnemax.kernels.sharding import KernelSharding

    x = make_inputs(np.random.default_rng(12), op, "head", batch=4, heads=4, time=20)
    x["q"], x["k"] = x["q"][:, :groups], x["k"][:, :groups]
    names = ["q", "k", "v", "g", "state"] + (["beta"] if op == "delta" else [])
    args = {n: jnp.asarray(x[n], jnp.float32) for n in names}
    w_o = jnp.asarray(np.random.default_rng(8).standard_normal(x["v"].shape), jnp.float32)

    def loss(args, backend, **kw):
        a = {**x, **args}
        if backend == "reference":
            a = {**a, **{n: jnp.repeat(a[n], 4 // groups, axis=1) for n in ("q", "k")}}
        o, S = call(op, a, backend=backend, chunk_size=16, **kw)
        return jnp.sum(o * w_o) + jnp.sum(S), (o, S)

    (_, (o_ref, S_ref)), g_ref = jax.value_and_grad(loss, has_aux=True)(args, "reference")
    with jax.set_mesh(jax.make_mesh((4, 2), ("rows", "cols"))):
        run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1,
                      static_argnames=("interpret", "sharding", "config"))
        (_, (o, S)), g = run(args, "pallas_gpu", interpret=True, sharding=KernelSharding(batch=("rows",), heads="cols"),
                             config=ChunkedConfig(group_heads=group_heads))
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4, (rel_err(o, o_ref), rel_err(S, S_ref))
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-3, (name, rel_err(g[name], g_ref[name]))
