"""Which mesh axes split a kernel's batch and heads: told, never guessed from axis names.

A ``pallas_call`` is opaque to XLA's SPMD partitioner: under a mesh it is replicated,
every device running the whole batch. The Pallas backends therefore run per shard
under ``jax.shard_map``, and the caller says over which mesh axes::

    KernelSharding(batch=("data", "fsdp"), heads="tensor")   # the trainer's mesh
    KernelSharding(batch=("dp",))                           # a user's own mesh
    KernelSharding.replicated()                              # run whole on every device, on purpose

Rules (:func:`plan`), applied when a Pallas backend is traced under a mesh context
(``jax.set_mesh`` / ``jax.sharding.use_abstract_mesh``) of more than one device:

* ``sharding=None`` is an error naming the op: without it the kernel would run
  replicated on what is most likely a sharded input;
* every named axis must be an axis of the mesh; the batch must divide by the product
  of the batch axes' sizes and the heads/channels by the heads axis' size (ValueError,
  never a silent fallback to a replicated run);
* axes of size 1 are dropped.

Outside a mesh context, or on a one-device mesh, the kernel runs whole and the
sharding is not consulted (a model built for a sharded run also runs in a notebook).
The XLA and reference backends are partitioned by XLA itself and ignore it.
"""

from __future__ import annotations

import dataclasses
import math

import jax


@dataclasses.dataclass(frozen=True)
class KernelSharding:
    """The mesh axes that split a kernel's inputs (a static, hashable argument).

    Attributes:
      batch: mesh axes splitting the batch dimension, outermost first (may be empty).
      heads: the mesh axis splitting heads (mLSTM, sLSTM) or channels (the scans), or None.
    """

    batch: tuple[str, ...] = ()
    heads: str | None = None

    def __post_init__(self):
        batch = self.batch
        if isinstance(batch, str):
            batch = (batch,)
        if not isinstance(batch, (tuple, list)) or not all(isinstance(a, str) for a in batch):
            raise TypeError(f"KernelSharding.batch must be a tuple of mesh axis names, got {self.batch!r}")
        if len(set(batch)) != len(batch):
            raise ValueError(f"KernelSharding.batch names an axis twice: {self.batch!r}")
        if self.heads is not None and not isinstance(self.heads, str):
            raise TypeError(f"KernelSharding.heads must be a mesh axis name or None, got {self.heads!r}")
        if self.heads is not None and self.heads in batch:
            raise ValueError(f"KernelSharding: axis {self.heads!r} splits both the batch and the heads")
        object.__setattr__(self, "batch", tuple(batch))

    @classmethod
    def replicated(cls) -> KernelSharding:
        """Every device runs the whole kernel (only right where the inputs are replicated)."""
        return cls()


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How one call is split: ``rows``/``cols`` are PartitionSpec entries for the batch and
    the heads/channels dimension (None: not split)."""

    rows: str | tuple[str, ...] | None
    cols: str | None

    @property
    def split(self) -> bool:
        return self.rows is not None or self.cols is not None


WHOLE = ShardPlan(None, None)


def plan(op: str, sharding: KernelSharding | None, batch: int, heads: int | None = None) -> ShardPlan:
    """The per-shard split of a Pallas call of ``op`` on ``batch`` rows and ``heads``
    heads/channels under the current mesh context (see the module docstring's rules)."""
    if sharding is not None and not isinstance(sharding, KernelSharding):
        raise TypeError(f"{op}: sharding must be a KernelSharding or None, got {type(sharding).__name__}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return WHOLE
    if sharding is None:
        raise ValueError(
            f"{op}: a Pallas kernel traced under a mesh of {dict(mesh.shape)} would run replicated "
            "(the SPMD partitioner cannot split a pallas_call): pass sharding=KernelSharding(batch=(...), "
            "heads=...) naming the mesh axes that split the batch and heads, or KernelSharding.replicated() "
            "if every device should run the whole batch")
    for axis in (*sharding.batch, *(() if sharding.heads is None else (sharding.heads,))):
        if axis not in mesh.axis_names:
            raise ValueError(f"{op}: sharding names mesh axis {axis!r}, but the mesh has axes {tuple(mesh.axis_names)}")
    axes = tuple(a for a in sharding.batch if mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    if batch % n:
        raise ValueError(f"{op}: batch {batch} does not split over mesh axes {axes} of {n} devices; "
                         "expected a multiple of it")
    rows = (axes if len(axes) > 1 else axes[0]) if axes else None
    cols = None
    if sharding.heads is not None and mesh.shape[sharding.heads] > 1:
        if heads is None:
            raise ValueError(f"{op}: sharding splits heads over {sharding.heads!r}, but this op has no head dimension")
        if heads % mesh.shape[sharding.heads]:
            raise ValueError(f"{op}: {heads} heads/channels do not split over mesh axis {sharding.heads!r} of "
                             f"{mesh.shape[sharding.heads]} devices; expected a multiple of it")
        cols = sharding.heads
    return ShardPlan(rows, cols)


def per_shard(fn, args: tuple, in_specs: tuple, out_specs):
    """``fn(*args)`` run per shard under ``jax.shard_map`` with these specs (an entry of
    ``args`` may be None: its spec is dropped). On a mesh with Explicit axes the inputs'
    types must match the specs, so they are resharded to them first (a no-op where they
    already do); on Auto axes shard_map places them itself."""
    in_specs = tuple(None if a is None else sp for a, sp in zip(args, in_specs))
    if jax.sharding.get_abstract_mesh().explicit_axes:
        def reshard(spec_tree, arg):  # a spec may be a prefix of its argument's pytree (one spec for a state)
            return jax.tree.map(lambda sp, sub: jax.tree.map(lambda leaf: jax.sharding.reshard(leaf, sp), sub),
                                spec_tree, arg, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        args = tuple(None if a is None else reshard(sp, a) for a, sp in zip(args, in_specs))
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
