"""The GPU sLSTM kernels (Pallas, Triton lowering): one launch for the whole sequence,
forward and backward, with each head's recurrent matrices split over ``splits``
programs that stay resident on chip for all the steps.

Why split: at d 1024 with 4 heads, one head's four ``256 x 256`` recurrent matrices are
1 MB in float32, far more than one SM holds. So program ``s`` of a (head, batch block)
group keeps only the columns ``[s U, (s+1) U)`` of every gate's matrix (``U = D /
splits``, 64 KB by default: in registers for the whole sequence) and computes those
units' gates, cell and output. Each step, every program needs all of ``h_{t-1}``: the
programs of a group write their slice of ``h_t`` to global memory, add one to the group's
step counter (a scalar atomic after a CTA barrier, acquire/release at GPU scope), wait
until the counter shows every program of the group has, and read the full row once.
Before it waits, each step issues the next step's loads that no other program writes
(the gate inputs and reset mask; backward: the saved pre-activations, cell states and
output gradients) and carries them in registers, so only the exchanged row's read
follows the wait. Per step that is one ``(Bb, D) x (D, 4 U)`` product on the tensor
cores (TF32, or TF32x3 for float32 accuracy), the elementwise step
(:func:`~mnemax.kernels.slstm.common.pointwise`), and one exchange through L2.

The backward walks the steps last to first. Program ``s`` computes its units' gate
gradients from the saved gate pre-activations and states (no recomputed matmul,
:func:`~mnemax.kernels.slstm.common.adjoint`) and multiplies them by its rows of ``R^T``:
a partial sum of the recurrent gradient ``dh_{t-1} = sum_g dgate_g R_g^T`` over its
units, which it writes to a two-slot ring; after the wait each program sums its own
columns over the group's partials (16 KB read per program and step at d 256, with
volatile loads since the slots are reused). ``dR`` and ``db`` are then large matmuls /
sums over (batch, time) done by XLA, dR at the recurrent products' precision (TF32 with
TF32 products, else float32).

All programs of a launch must be resident at once (they wait on each other), so a launch
has at most ``max_programs`` programs (default: the GPU's SM count) and larger problems
are cut into several launches over (head, batch block) groups.

Interpret mode (CPU) cannot run programs concurrently, so there each program emulates its
group's ``splits`` programs one after the other inside every step, through the same
exchange buffers and slices: it checks the split data flow, not the concurrency
(the ``gpu``-marked tests run the real thing).

Tuning: :class:`~mnemax.kernels.slstm.common.SLSTMConfig` (``splits``, ``batch_block``,
``fwd_warps`` / ``bwd_warps``, ``precision``, ``max_programs``), a static argument of
:func:`forward` and :func:`backward`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..dispatch import gpu_sm_count
from .common import F32, SLSTMConfig, adjoint, pad, pointwise

R_SLICE_BYTES = 64 * 1024  # one program's slice of the four recurrent matrices, float32


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class Plan:
    """Static sizes of one call: padded head dim ``d``, ``splits`` x ``u`` units, batch
    block ``bb``, ``nb`` blocks, ``groups`` = heads x nb, ``per_launch`` groups per launch,
    the products' ``precision`` and dR's ``dr_precision``, ``warps``."""

    def __init__(self, batch, heads, head_dim, config: SLSTMConfig, interpret):
        self.d = d = max(16, _pow2(head_dim))
        splits = config.splits
        if splits is None:
            u = min(d, max(16, R_SLICE_BYTES // (16 * d)))
            splits = d // u
        if splits < 1 or splits & (splits - 1) or d // splits < 16 or d % splits:
            raise ValueError(f"SLSTMConfig.splits: got {splits}; expected a power of two leaving >= 16 units per "
                             f"program (head dim padded to {d})")
        self.splits, self.u = splits, d // splits
        bb = config.batch_block or min(64, max(16, _pow2(batch)))
        self.bb, self.nb = bb, -(-batch // bb)
        self.bp, self.groups = self.nb * bb, heads * self.nb
        precision = config.precision or _default_precision()
        self.precision = lax.Precision.HIGHEST if interpret else {
            "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3, "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32,
            "ieee": lax.Precision.HIGHEST}[precision]
        # dR (an XLA product over batch x time) at the recurrent products' precision: TF32
        # (XLA's default) when they are TF32, float32 otherwise
        self.dr_precision = lax.Precision.HIGHEST if interpret or precision != "tf32" else lax.Precision.DEFAULT
        max_programs = config.max_programs or (None if interpret else gpu_sm_count())
        if max_programs is not None and max_programs < splits:
            raise ValueError(f"SLSTMConfig.max_programs: got {max_programs}; expected >= splits ({splits})")
        # interpret mode cuts launches only when told to (to test the cutting)
        self.per_launch = self.groups if max_programs is None else max(1, max_programs // splits)
        self.warps = {"fwd": config.fwd_warps, "bwd": config.bwd_warps}
        self.interpret = bool(interpret)


def _default_precision() -> str:
    """The recurrent products' precision when not set: as JAX's default matmul precision
    would make XLA's (TF32 on the tensor cores unless float32 is asked for)."""
    want = str(jax.config.jax_default_matmul_precision or "default").lower()
    return "tf32x3" if want in ("float32", "highest", "f32_f32_f32") else "tf32"


def _dot(a, b, precision, dims=((1,), (0,))):
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=F32)


def _received(ref, ok):
    """The exchange row ``ref``, read once after :func:`_sync` waited for it (L1 never
    holds a stale copy). ``ok`` False masks the load off (no row yet: zeros)."""
    from jax.experimental.pallas import triton as plt

    return plt.load(ref, mask=jnp.broadcast_to(ok, ref.shape), other=0)


def _sync(flags, g, mine, step, plan):
    """Tell the group this program finished ``step`` (1-based) and wait until all its
    programs have: one int32 counter per group, a scalar atomic add per program (Triton
    runs a scalar atomic on one thread) and polls by scalar atomic reads. Returns a true
    scalar that the loads of the exchanged data take into their masks, so that they
    cannot be issued before the wait (a data dependency, besides the barrier)."""
    from jax.experimental.pallas import triton as plt

    barrier = (lambda: None) if plan.interpret else plt.debug_barrier  # no CPU rule; one thread there anyway
    barrier()  # every thread's stores precede the release below
    zero = g * 0  # traced: a constant inside the wait loop has no interpret-mode rule
    target = jnp.asarray(step, jnp.int32) * plan.splits
    plt.atomic_add(flags, (g, zero), zero + len(mine))  # acq_rel, GPU scope

    def seen():
        return plt.atomic_add(flags, (g, zero), zero)

    last = lax.while_loop(lambda m: m < target, lambda m: seen(), seen())
    barrier()
    return last >= target


def _program(plan, g0):
    """This program's group (in the launch), head, slice indices and unit slices (all of
    the group's slices when interpret mode emulates them in turn)."""
    g = pl.program_id(0)
    mine = list(range(plan.splits)) if plan.interpret else [pl.program_id(1)]
    return g, (g0 + g) // plan.nb, mine, [pl.ds(s * plan.u, plan.u) for s in mine]


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(x_r, R_r, s0_r, k_r, hs0_r, f0_r, hs_r, sT_r, f_r, *saved, plan, T, g0):
    del hs0_r, f0_r  # aliased to hs_r, f_r
    g, head, mine, cols = _program(plan, g0)
    prec = plan.precision
    R = [[R_r[head, k, :, c] for k in range(4)] for c in cols]  # (d, u) column slices, kept in registers
    h_init = s0_r[g, 0]
    init = tuple(tuple(s0_r[g, k, :, c] for k in range(4)) for c in cols)

    def inputs(t):  # what step t reads that no other program writes
        return k_r[g, t], tuple(tuple(x_r[g, t, k, :, c] for k in range(4)) for c in cols)

    def step(t, carry):
        ready, ahead, carry = carry
        keep, xs = ahead  # keep: (bb, 1)
        prev = _received(hs_r.at[g, jnp.maximum(t - 1, 0)], (t > 0) & ready)
        hprev = jnp.where(t == 0, h_init, prev) * keep
        out = []
        for i, c in enumerate(cols):
            _, c0, n0, m0 = (v * keep for v in carry[i])
            raw = [xs[i][k] + _dot(hprev, R[i][k], prec) for k in range(4)]
            p = pointwise(raw, c0, n0, m0)
            hs_r[g, t, :, c] = p["h1"]
            if saved:
                raw_r, cnm_r = saved
                for k in range(4):
                    raw_r[g, t, k, :, c] = raw[k]
                for k, name in enumerate(("c1", "n1", "m1")):
                    cnm_r[g, t, k, :, c] = p[name]
            out.append((p["h1"], p["c1"], p["n1"], p["m1"]))
        ahead = inputs(jnp.minimum(t + 1, T - 1))  # issued before the wait
        return _sync(f_r, g, mine, t + 1, plan), ahead, tuple(out)

    _, _, final = lax.fori_loop(0, T, step, (jnp.bool_(True), inputs(0), init))
    for i, c in enumerate(cols):
        for k in range(4):
            sT_r[g, k, :, c] = final[i][k]


def _bwd_kernel(raw_r, cnm_r, s0_r, k_r, dh_r, gT_r, R_r, dx0_r, f0_r, dx_r, d0_r, f_r, ring_r, *, plan, T, g0):
    """Each program multiplies its own gate gradients by its (u, d) rows of R^T and writes
    the (bb, d) partial sum to a two-slot ring; each then sums its u columns over the
    group's partials (bb x d words per step, read with volatile loads since the slots are
    reused)."""
    del dx0_r, f0_r  # aliased to dx_r, f_r
    from jax.experimental.pallas import triton as plt

    g, head, mine, rows = _program(plan, g0)
    prec = plan.precision
    R = [[R_r[head, k, r, :] for k in range(4)] for r in rows]  # (u, d_in) rows of R^T, kept in registers

    def recurrent(i, ok, slot):  # this slice of sum_g dgate_g(t) R_g^T
        ref = ring_r.at[g, jnp.asarray(slot, jnp.int32), :, :, rows[i]]  # (splits, bb, u): every program's partial
        part = plt.load(ref, mask=jnp.broadcast_to(ok, ref.shape), other=0.0, volatile=not plan.interpret)
        return jnp.sum(part, axis=0)

    init = tuple(tuple(gT_r[g, k, :, r] for k in (1, 2, 3)) for r in rows)

    def inputs(t):  # what step t reads that no other program writes
        tn, tp = jnp.minimum(t + 1, T - 1), jnp.maximum(t - 1, 0)
        per_slice = tuple((
            dh_r[g, t, :, r],
            tuple(jnp.where(t == 0, s0_r[g, k + 1, :, r], cnm_r[g, tp, k, :, r]) for k in range(3)),
            tuple(raw_r[g, t, k, :, r] for k in range(4)),
        ) for r in rows)
        return k_r[g, t], k_r[g, tn], per_slice

    def step(j, carry):
        ready, ahead, carry = carry
        t = T - 1 - j
        keep, keep_n, per_slice = ahead
        out, draws = [], []
        for i, r in enumerate(rows):
            dh_t, cnm_p, raw_t = per_slice[i]
            dh_rec = recurrent(i, (t < T - 1) & ready, 1 - (j & 1))  # the other slot: step j - 1's
            dh1 = jnp.where(t == T - 1, gT_r[g, 0, :, r], keep_n * dh_rec) + dh_t
            c0, n0, m0 = (v * keep for v in cnm_p)
            p = pointwise(list(raw_t), c0, n0, m0)
            draw, d_in = adjoint(p, dh1, *carry[i])
            for k in range(4):
                dx_r[g, t, k, :, r] = draw[k]
            out.append(tuple(v * keep for v in d_in))
            draws.append(draw)
        # after every slice read the other slot (interpret mode runs them in turn)
        for i, s in enumerate(mine):
            ring_r[g, j & 1, s] = sum(_dot(draws[i][k], R[i][k], prec) for k in range(4))
        ahead = inputs(jnp.maximum(t - 1, 0))  # issued before the wait
        return _sync(f_r, g, mine, j + 1, plan), ahead, tuple(out)

    ready, _, final = lax.fori_loop(0, T, step, (jnp.bool_(True), inputs(jnp.int32(T - 1)), init))
    keep0 = k_r[g, 0]
    for i, r in enumerate(rows):
        d0_r[g, 0, :, r] = keep0 * recurrent(i, ready, (T - 1) % 2)
        for k in range(3):
            d0_r[g, k + 1, :, r] = final[i][k]


def _launch(plan, kernel, ins, out_shapes, warps):
    """Run ``kernel`` over every group, ``plan.per_launch`` groups per launch. ``ins``:
    per-group arrays (leading axis = groups) and shared ones (wrapped in a tuple). Output 0
    (the forward's exchanged h rows; the backward's dx) and output 2 (the group counters)
    come in zero-filled as the last two inputs, aliased."""
    from jax.experimental.pallas import triton as plt

    outs = []
    for g0 in range(0, plan.groups, plan.per_launch):
        n = min(plan.per_launch, plan.groups - g0)
        args = [a[0] if isinstance(a, tuple) else a[g0:g0 + n] for a in ins]
        flags = jnp.zeros((n, 1), jnp.int32)
        shapes = [jax.ShapeDtypeStruct((n, *s[1:]), d) for s, d in out_shapes]
        shapes.insert(2, jax.ShapeDtypeStruct(flags.shape, flags.dtype))
        first = jnp.zeros(shapes[0].shape, shapes[0].dtype)
        kw = {} if plan.interpret else {"compiler_params": plt.CompilerParams(num_warps=warps, num_stages=1)}
        res = pl.pallas_call(
            functools.partial(kernel, g0=g0), grid=(n, 1 if plan.interpret else plan.splits), out_shape=shapes,
            input_output_aliases={len(args): 0, len(args) + 1: 2}, interpret=plan.interpret, **kw,
        )(*args, first, flags)
        outs.append([o for k, o in enumerate(res) if k != 2])
    return [jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0] for parts in zip(*outs)]


# ----------------------------------------------------------------------------- layouts


def _groups(a, plan, batch_axis, head_axis):
    """(..., batch, ..., heads, ...) -> (heads x batch blocks, ...) with the batch block
    in place of the batch axis (padded) and the head axis dropped."""
    a = pad(a, batch_axis, plan.bp)
    a = jnp.moveaxis(a, (head_axis, batch_axis), (0, 1))
    H = a.shape[0]
    a = a.reshape(H, plan.nb, plan.bb, *a.shape[2:])
    return a.reshape(H * plan.nb, plan.bb, *a.shape[3:])


def _ungroup(a, plan, heads, bb_axis):
    """(groups, ..., bb at ``bb_axis``, ...) -> (heads, batch padded, ...)."""
    a = jnp.moveaxis(a, bb_axis, 1)
    return a.reshape(heads, plan.bp, *a.shape[2:])


def _state_in(states, plan):
    """4 arrays (B, H, D) -> (groups, 4, bb, d), float32."""
    a = pad(jnp.stack([s.astype(F32) for s in states]), 3, plan.d)  # (4, B, H, d)
    return jnp.moveaxis(_groups(a, plan, 1, 2), 1, 2)


def _state_out(a, plan, heads, B, D):
    """(groups, 4, bb, d) -> 4 arrays (B, H, D)."""
    a = _ungroup(a, plan, heads, 2)  # (H, bp, 4, d)
    return tuple(jnp.transpose(a[:, :B, k, :D], (1, 0, 2)) for k in range(4))


def forward(x, R, b, state, keep, *, config: SLSTMConfig, save, interpret):
    """h (B, T, H, D), the final state and, with ``save``, what the backward needs."""
    B, T, _, H, D = x.shape
    plan = Plan(B, H, D, config, interpret)
    d = plan.d
    pre = pad((x + b[None, None]).astype(F32), 4, d)  # (B, T, 4, H, d)
    xg = jnp.moveaxis(_groups(pre, plan, 0, 3), 1, 3)  # (G, T, 4, bb, d)
    Rs = pad(pad(jnp.transpose(R.astype(F32), (0, 2, 1, 3)), 2, d), 3, d)  # (H, 4, d_in, d_out)
    s0 = _state_in(state, plan)  # (G, 4, bb, d)
    kp = jnp.ones((B, T), F32) if keep is None else keep.astype(F32)
    kb = jnp.transpose(pad(kp, 0, plan.bp).reshape(plan.nb, plan.bb, T), (0, 2, 1))[..., None]
    kg = jnp.tile(kb, (H, 1, 1, 1))  # (G, T, bb, 1), groups head-major
    G, bb = plan.groups, plan.bb
    out_shapes = [((G, T, bb, d), F32), ((G, 4, bb, d), F32)]
    if save:
        out_shapes += [((G, T, 4, bb, d), F32), ((G, T, 3, bb, d), F32)]
    kernel = functools.partial(_fwd_kernel, plan=plan, T=T)
    hs, sT, *rest = _launch(plan, kernel, [xg, (Rs,), s0, kg], out_shapes, plan.warps["fwd"])
    h = jnp.transpose(_ungroup(hs, plan, H, 2), (1, 2, 0, 3))[:B, :, :, :D]  # (B, T, H, D)
    final = _state_out(sT, plan, H, B, D)
    saved = (Rs, s0, kg, hs, *rest) if save else None
    return h, final, saved


def backward(shape, saved, dh, dfinal, *, config: SLSTMConfig, interpret):
    """Gradients (dx, dR, db, dstate0) in the op's layouts."""
    B, T, _, H, D = shape
    plan = Plan(B, H, D, config, interpret)
    Rs, s0, kg, hs, raw, cnm = saved
    d = plan.d
    dhg = jnp.moveaxis(_groups(pad(dh.astype(F32), 3, d), plan, 0, 2), 1, 2)  # (G, T, bb, d)
    gT = _state_in(dfinal, plan)
    G, bb = plan.groups, plan.bb
    kernel = functools.partial(_bwd_kernel, plan=plan, T=T)
    RsT = jnp.swapaxes(Rs, 2, 3)  # (H, 4, d_out, d_in): the backward's slices need no transpose on chip
    out_shapes = [((G, T, 4, bb, d), F32), ((G, 4, bb, d), F32),
                  ((G, 2, plan.splits, bb, d), F32)]  # the ring of partial sums (scratch)
    dx, d0, _ = _launch(plan, kernel, [raw, cnm, s0, kg, dhg, gT, (RsT,)], out_shapes, plan.warps["bwd"])
    # dR and db: sums over (batch, time) of the step's input state times its gate gradients
    hprev = jnp.concatenate([s0[:, None, 0], hs[:, :-1]], axis=1) * kg  # (G, T, bb, d)
    hp = hprev.reshape(H, plan.nb, T, bb, d)
    dxh = dx.reshape(H, plan.nb, T, 4, bb, d)
    dR = jnp.einsum("hjtbi,hjtkbo->hiko", hp, dxh, precision=plan.dr_precision)[:, :D, :, :D]
    db = jnp.transpose(jnp.sum(dxh, axis=(1, 2, 4)), (1, 0, 2))[:, :, :D]  # (4, H, D)
    dxo = jnp.transpose(_ungroup(dx, plan, H, 3), (1, 2, 3, 0, 4))[:B, :, :, :, :D]  # (B, T, 4, H, D)
    return dxo, dR, db, _state_out(d0, plan, H, B, D)
