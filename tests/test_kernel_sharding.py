"""``mnemax.kernels.sharding.plan``: which mesh axes a Pallas call is split over, from an
explicit ``KernelSharding`` under a mesh of any axis names, and the errors that replace
a silently replicated run. (Each op's per-shard results against the unsharded ones are
in its own kernel tests.)"""

import jax
import pytest

from mnemax import sharding as zoo_sharding
from mnemax.kernels.sharding import WHOLE, KernelSharding, ShardPlan, plan


def test_no_mesh_or_one_device_runs_whole():
    assert plan("op", None, 8, 4) == WHOLE
    assert plan("op", KernelSharding(batch=("nope",)), 8, 4) == WHOLE
    with jax.set_mesh(jax.make_mesh((1,), ("rows",))):
        assert plan("op", None, 3, 5) == WHOLE


def test_axes_of_any_name_split_rows_and_heads():
    with jax.set_mesh(jax.make_mesh((4, 2), ("rows", "cols"))):
        assert plan("op", KernelSharding(batch=("rows",), heads="cols"), 8, 6) == ShardPlan("rows", "cols")
        assert plan("op", KernelSharding(batch=("rows", "cols")), 16, None) == ShardPlan(("rows", "cols"), None)
        assert plan("op", KernelSharding(heads="cols"), 3, 4) == ShardPlan(None, "cols")
        assert plan("op", KernelSharding.replicated(), 3, 5) == WHOLE
        assert not WHOLE.split and ShardPlan("rows", None).split
    with jax.set_mesh(jax.make_mesh((8, 1), ("dp", "tp"))):  # a size-1 axis splits nothing
        assert plan("op", KernelSharding(batch=("dp",), heads="tp"), 8, 3) == ShardPlan("dp", None)


def test_a_replicated_or_impossible_split_is_an_error():
    with jax.set_mesh(jax.make_mesh((4, 2), ("rows", "cols"))):
        with pytest.raises(ValueError, match=r"selective_scan: a Pallas kernel .* would run replicated"):
            plan("selective_scan", None, 8, 4)
        with pytest.raises(ValueError, match=r"names mesh axis 'data', but the mesh has axes \('rows', 'cols'\)"):
            plan("op", KernelSharding(batch=("data",)), 8, 4)
        with pytest.raises(ValueError, match="batch 6 does not split over mesh axes \\('rows',\\) of 4 devices"):
            plan("op", KernelSharding(batch=("rows",)), 6, 4)
        with pytest.raises(ValueError, match="3 heads/channels do not split over mesh axis 'cols' of 2 devices"):
            plan("op", KernelSharding(heads="cols"), 8, 3)
        with pytest.raises(ValueError, match="has no head dimension"):
            plan("op", KernelSharding(heads="cols"), 8, None)
        with pytest.raises(TypeError, match="sharding must be a KernelSharding or None, got tuple"):
            plan("op", ("rows",), 8, 4)


def test_bad_kernel_shardings_are_refused():
    assert KernelSharding(batch="rows").batch == ("rows",)
    with pytest.raises(TypeError, match="batch must be a tuple of mesh axis names"):
        KernelSharding(batch=(0,))
    with pytest.raises(ValueError, match="names an axis twice"):
        KernelSharding(batch=("a", "a"))
    with pytest.raises(ValueError, match="splits both the batch and the heads"):
        KernelSharding(batch=("a",), heads="a")
    with pytest.raises(TypeError, match="heads must be a mesh axis name or None"):
        KernelSharding(heads=("a",))
    assert hash(KernelSharding(batch=("a",))) == hash(KernelSharding(batch=["a"]))


def test_the_trainer_mesh_names_its_own_axes():
    mesh = zoo_sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ks = zoo_sharding.kernel_sharding(mesh)
    assert ks == KernelSharding(batch=("data", "fsdp"), heads="tensor")
    with jax.set_mesh(mesh):
        assert plan("op", ks, 8, 4) == ShardPlan(("data", "fsdp"), "tensor")
    assert zoo_sharding.kernel_sharding(jax.make_mesh((8,), ("data",))) == KernelSharding(batch=("data",))
