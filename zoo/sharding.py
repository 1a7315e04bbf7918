"""Meshes and shardings (``mnemax.sharding``): a (data, fsdp, tensor) mesh and the logical-axis rules.

Parameters carry logical axis names (``('embed', 'mlp')``, ...). ``RULES`` maps them
to mesh axes: the batch splits over ``data`` and ``fsdp``; FSDP shards parameters
(and with them the optimizer state) over ``fsdp`` along their ``embed`` dimension;
tensor parallelism splits heads, MLP width and the vocabulary over ``tensor``. A
dimension that the mesh axes do not divide stays whole (replicated) rather than
padded, and no mesh axis is used twice in one array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mnemax.kernels.sharding import KernelSharding

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes that split the batch (activations, data, the kernels' rows)
TENSOR_AXIS = "tensor"  # the axis that splits heads, channels, MLP width and vocabulary

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("inner", "tensor"),
)


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fills one ``-1`` axis with the rest of the devices; ValueError names the field."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"mesh.{unknown[0]}: unknown mesh axis; axes are {AXES}")
    sizes = {a: int(sizes.get(a, 1)) for a in AXES}
    free = [a for a, n in sizes.items() if n == -1]
    for a, n in sizes.items():
        if n == 0 or n < -1:
            raise ValueError(f"mesh.{a}: must be a positive size or -1, got {n}")
    if len(free) > 1:
        raise ValueError(f"mesh.{free[1]}: only one mesh axis may be -1, got -1 for {free}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if num_devices % fixed:
            axis = max((a for a in AXES if sizes[a] != -1), key=lambda a: sizes[a])
            raise ValueError(
                f"mesh.{axis}: the fixed mesh axes {({a: n for a, n in sizes.items() if n != -1})} "
                f"(product {fixed}) do not divide the {num_devices} devices"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        axis = max(AXES, key=lambda a: sizes[a])
        raise ValueError(
            f"mesh.{axis}: the mesh {sizes} has {fixed} devices, but {num_devices} are in use "
            "(set one axis to -1, or mesh.num_devices)"
        )
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with ``AxisType.Auto`` axes over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        tuple(shape[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices
    )


def kernel_sharding(mesh: Mesh | None = None) -> KernelSharding:
    """The mesh axes of :func:`make_mesh`'s vocabulary that the Pallas kernels run per
    shard over: the batch over ``data`` and ``fsdp``, heads/channels over ``tensor``
    (those of the axes ``mesh`` has; all of them when ``mesh`` is None). Models built by
    the trainer get it through ``mnemax.build(config, kernel_sharding=...)``."""
    names = AXES if mesh is None else tuple(mesh.axis_names)
    return KernelSharding(batch=tuple(a for a in BATCH_AXES if a in names),
                          heads=TENSOR_AXIS if TENSOR_AXIS in names else None)


def constrain_rows(x):
    """Pins the leading (batch) dim of an activation to the ``(data, fsdp)`` mesh axes.

    Acts only while tracing under a mesh context (``jax.set_mesh`` or
    ``jax.sharding.use_abstract_mesh``; the trainer sets one); identity otherwise, or when
    those axes do not divide the batch. Other dims stay unconstrained. Without it XLA may
    carry the FSDP parameters' ``embed`` sharding into the residual stream and then do the
    whole batch's arithmetic on every device (measured: an ``fsdp=4`` mesh ran at the
    speed of one GPU).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.ndim == 0 or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    rest = (P.UNCONSTRAINED,) * (x.ndim - 1)
    return jax.lax.with_sharding_constraint(x, P(axes if len(axes) > 1 else axes[0], *rest))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for an array with logical axis ``names``; undivisible dims stay whole."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def tree_shardings(boxed_abstract, mesh: Mesh, rules=RULES):
    """NamedShardings for a pytree whose leaves may be ``nn.LogicallyPartitioned`` boxes
    (as ``jax.eval_shape`` of an init returns); the result matches the unboxed tree."""

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, logical_to_spec(leaf.names, value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over (data, fsdp); the other dims whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """The global row indices this process must supply for an array with ``sharding``."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        sl = idx[0]
        start, stop, _ = sl.indices(global_shape[0])
        rows.update(range(start, stop))
    return np.array(sorted(rows), dtype=np.int64)
