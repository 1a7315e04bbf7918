"""The GPU sLSTM kernels (Pallas, Triton lowering): one launch for the whole sequence,
forward and backward, with each head's recurrent matrices split over ``splits``
programs that stay resident on chip for all the steps.

Why split: at d 1024 with 4 heads, one head's four ``256 x 256`` recurrent matrices are
1 MB in float32, far more than one SM holds. So program ``s`` of a (head, batch block)
group keeps only the columns ``[s U, (s+1) U)`` of every gate's matrix (``U = D /
splits``, 64 KB by default: in registers) and computes those units' gates, cell and
output. Each step, every program needs all of ``h_{t-1}``: the programs of a group write
their slice of ``h_t`` to global memory, add one to the group's step counter (a scalar
atomic after a CTA barrier, acquire/release at GPU scope), wait until the counter shows
every program of the group has, and read the full row once (the default,
``spin="counter"``). Alternatives: per-program flags polled as a vector (``"flags"``), or
no flag at all (``"data"``): the row buffer starts filled with a NaN bit pattern no float
op produces, each word is written once, and a reader re-reads the row with volatile loads
until no word holds the pattern (as in NCCL's LL protocol). On an H100 ``data`` matched
the counter forward and was 8x slower backward, where each step re-reads 64 KB.
Per step that is one ``(Bb, D) x (D, 4 U)`` product on the tensor cores (TF32, or TF32x3
for float32 accuracy), the elementwise step, and one exchange through L2.

The backward walks the steps last to first. Program ``s`` computes its units' gate
gradients from the saved gate pre-activations and states (no recomputed matmul) and
multiplies them by its rows of ``R^T``: a partial sum of the recurrent gradient
``dh_{t-1} = sum_g dgate_g R_g^T`` over its units, which it writes to a two-slot ring;
after the wait each program sums its own columns over the group's partials (16 KB read per
program and step at d 256; the ``gates`` alternative exchanges the gate gradients, 64 KB,
and was 1.8x slower overall). ``dR`` and ``db`` are then large matmuls / sums over
(batch, time) done by XLA.

All programs of a launch must be resident at once (they wait on each other), so a launch
has at most ``max_programs`` programs (default: the GPU's SM count) and larger problems
are cut into several launches over (head, batch block) groups.

Interpret mode (CPU) cannot run programs concurrently, so there each program emulates its
group's ``splits`` programs one after the other inside every step, through the same
exchange buffers and slices: it checks the split data flow, not the concurrency
(the ``gpu``-marked tests run the real thing).

Options (``GPU_OPTIONS``, read at trace time): ``splits`` (None: the largest slice within
``R_SLICE_BYTES``), ``batch_block`` (None: the batch rounded up to a power of two in
[16, 64]), ``fwd_warps`` / ``bwd_warps``, ``precision`` (``tf32x3``, ``tf32``,
``ieee``; None: TF32, or TF32x3 when ``jax.default_matmul_precision`` asks for float32,
as XLA's dots would; interpret mode uses float32), ``max_programs``, ``spin`` (``data``, ``counter`` or ``flags``: see :func:`_received` and :func:`_sync`),
``r_resident`` (False: reload the R slice from L1/L2 every step instead of keeping it in
registers), ``bwd_exchange`` (``partials``, the default, or ``gates``: see
:func:`_bwd_kernel`; ``gates`` with ``spin="data"``), ``prefetch`` (True: each step
issues the next step's loads that do not depend on the exchange, the gate inputs, reset
mask, saved states and output gradients, before it waits on its group, and carries them
in registers, so that only the exchanged row's read follows the wait), ``dr_precision``
(the precision of dR, an XLA product over batch x time: ``tf32`` or ``highest``; None: TF32
when the recurrent products are TF32, else float32, so that a TF32 run does not spend a
millisecond on a float32 dR that XLA's own backward computes in TF32 too).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import pallas_slstm as ps
from .dispatch import gpu_sm_count as _sm_count
from .pallas_slstm import _pad

F32 = jnp.float32
R_SLICE_BYTES = 64 * 1024  # one program's slice of the four recurrent matrices, float32
GPU_OPTIONS = {"splits": None, "batch_block": None, "fwd_warps": 4, "bwd_warps": 4, "precision": None, "max_programs": None,
               "spin": "counter", "r_resident": True, "bwd_exchange": None, "prefetch": True,
               "dr_precision": None}
SPINS = ("data", "counter", "flags")
PRECISIONS = ("tf32x3", "tf32", "ieee")


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class Plan:
    """Static sizes of one call: padded head dim ``d``, ``splits`` x ``u`` units, batch
    block ``bb``, ``nb`` blocks, ``groups`` = heads x nb, ``per_launch`` groups per launch."""

    def __init__(self, batch, heads, head_dim, options, interpret):
        o = {**GPU_OPTIONS, **options}
        self.d = d = max(16, _pow2(head_dim))
        splits = o["splits"]
        if splits is None:
            u = min(d, max(16, R_SLICE_BYTES // (16 * d)))
            splits = d // u
        if splits < 1 or splits & (splits - 1) or d // splits < 16 or d % splits:
            raise ValueError(f"splits: got {splits}; expected a power of two leaving >= 16 units per program "
                             f"(head dim padded to {d})")
        self.splits, self.u = splits, d // splits
        bb = o["batch_block"] or min(64, max(16, _pow2(batch)))
        if bb < 16 or bb & (bb - 1):
            raise ValueError(f"batch_block: got {bb}; expected a power of two >= 16")
        self.bb, self.nb = bb, -(-batch // bb)
        self.bp, self.groups = self.nb * bb, heads * self.nb
        precision = o["precision"] or _default_precision()
        if precision not in PRECISIONS:
            raise ValueError(f"precision: got {precision!r}; expected one of {PRECISIONS}")
        self.precision = lax.Precision.HIGHEST if interpret else {
            "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3, "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32,
            "ieee": lax.Precision.HIGHEST}[precision]
        # dR (an XLA product over batch x time) at the recurrent products' precision: TF32
        # (XLA's default) when they are TF32, float32 otherwise
        dr = o["dr_precision"] or ("tf32" if precision == "tf32" else "highest")
        if dr not in ("tf32", "highest"):
            raise ValueError(f"dr_precision: got {dr!r}; expected 'tf32', 'highest' or None")
        self.dr_precision = lax.Precision.HIGHEST if interpret or dr == "highest" else lax.Precision.DEFAULT
        max_programs = o["max_programs"] or (None if interpret else _sm_count())
        if max_programs is not None and max_programs < splits:
            raise ValueError(f"max_programs: got {max_programs}; expected >= splits ({splits})")
        # interpret mode cuts launches only when told to (to test the cutting)
        self.per_launch = self.groups if max_programs is None else max(1, max_programs // splits)
        self.warps = {"fwd": int(o["fwd_warps"]), "bwd": int(o["bwd_warps"])}
        self.interpret = bool(interpret)
        if o["spin"] not in SPINS:
            raise ValueError(f"spin: got {o['spin']!r}; expected one of {SPINS}")
        self.spin, self.r_resident = o["spin"], bool(o["r_resident"])
        exchange = o["bwd_exchange"] or ("gates" if self.spin == "data" else "partials")
        if exchange not in ("gates", "partials"):
            raise ValueError(f"bwd_exchange: got {exchange!r}; expected 'gates' or 'partials'")
        if exchange == "partials" and self.spin == "data":
            raise ValueError("bwd_exchange: 'partials' reuses its ring slots, so it needs spin 'counter' or 'flags', not 'data'")
        self.bwd_exchange = exchange
        self.prefetch = bool(o["prefetch"])


def _default_precision() -> str:
    """The recurrent products' precision when not set: as JAX's default matmul precision
    would make XLA's (TF32 on the tensor cores unless float32 is asked for)."""
    want = str(jax.config.jax_default_matmul_precision or "default").lower()
    return "tf32x3" if want in ("float32", "highest", "f32_f32_f32") else "tf32"


def _dot(a, b, precision, dims=((1,), (0,))):
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=F32)


EMPTY = -1  # the bits of an exchange word not written yet (a NaN no float op produces)


def _bits(v):
    """float32 -> the int32 word stored in an exchange buffer, never ``EMPTY``."""
    b = lax.bitcast_convert_type(v, jnp.int32)
    return jnp.where(b == EMPTY, jnp.int32(0x7FC00000), b)  # that NaN -> the canonical quiet NaN


def _received(ref, ok, plan):
    """The exchange row ``ref`` (int32 words) as float32, once other programs wrote it.
    ``ok`` False masks the load off (no row yet: zeros).

    ``spin="data"``: the buffer starts filled with ``EMPTY`` and every word is written
    once, so a word that is not ``EMPTY`` is final: re-read the row (volatile loads, which
    bypass L1) until it holds no ``EMPTY`` word. No flag, fence or atomic; each word
    carries its own readiness (as in NCCL's LL protocol). Otherwise the row was waited
    for by :func:`_sync`, is read once, and L1 never holds a stale copy."""
    from jax.experimental.pallas import triton as plt

    mask = jnp.broadcast_to(ok, ref.shape)
    if plan.spin != "data" or plan.interpret:
        row = plt.load(ref, mask=mask, other=0)
    else:
        def load():
            return plt.load(ref, mask=mask, other=0, volatile=True)

        row = lax.while_loop(lambda r: jnp.max(jnp.where(r == EMPTY, 1, 0)) > 0, lambda r: load(), load())
    return lax.bitcast_convert_type(row, F32)


def _sync(flags, g, mine, step, plan):
    """Tell the group this program finished ``step`` (1-based) and wait until all its
    programs have. Returns a true scalar that the loads of the exchanged data take into
    their masks, so that they cannot be issued before the wait (a data dependency,
    besides the barrier).

    ``spin="data"``: nothing to do (the data carries its readiness, :func:`_received`).
    ``spin="counter"``: one int32 counter per group, a scalar atomic add per program
    (Triton runs a scalar atomic on one thread) and polls by scalar atomic reads, so a
    group of ``splits`` programs makes ``splits`` atomics per poll. ``spin="flags"``: a
    float flag per program (atomic max) and polls reading the group's flags as a vector of
    acquire RMWs: every thread holding a copy of an element issues one, which contends."""
    from jax.experimental.pallas import triton as plt

    if plan.spin == "data":  # the readers wait on the data itself (see _received)
        return g >= 0
    barrier = (lambda: None) if plan.interpret else plt.debug_barrier  # no CPU rule; one thread there anyway
    barrier()  # every thread's stores precede the release below
    if plan.spin == "counter":
        zero = g * 0  # traced: a constant inside the wait loop has no interpret-mode rule
        target = jnp.asarray(step, jnp.int32) * plan.splits
        plt.atomic_add(flags, (g, zero), zero + len(mine))  # acq_rel, GPU scope

        def seen():
            return plt.atomic_add(flags, (g, zero), zero)
    else:
        # float flags (exact to 2^24 steps): the Triton lowering of integer atomics on a
        # vector of addresses picks the float instruction
        target = jnp.asarray(step, F32)
        for s in mine:
            plt.atomic_max(flags, (g, jnp.asarray(s, jnp.int32)), target)

        zeros = jnp.broadcast_to(g * 0, (plan.splits,)).astype(F32)  # traced (see above)

        def seen():
            return jnp.min(plt.atomic_add(flags, (g, pl.ds(0, plan.splits)), zeros))

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

    def r_cols():  # (d, u) column slices of the four matrices
        return [[R_r[head, k, :, c] for k in range(4)] for c in cols]

    Rk = r_cols() if plan.r_resident else None  # kept across steps (registers)
    h_init = s0_r[g, 0]
    init = tuple(tuple(s0_r[g, k, :, c] for k in range(4)) for c in cols)

    def inputs(t):  # what step t reads that no other program writes
        return k_r[g, t], tuple(tuple(x_r[g, t, k, :, c] for k in range(4)) for c in cols)

    def step(t, carry):
        ready, ahead, carry = carry
        R = Rk if plan.r_resident else r_cols()
        keep, xs = ahead if plan.prefetch else inputs(t)  # keep: (bb, 1)
        prev = _received(hs_r.at[g, jnp.maximum(t - 1, 0)], (t > 0) & ready, plan)
        hprev = jnp.where(t == 0, h_init, prev) * keep
        out = []
        for i, c in enumerate(cols):
            _, c0, n0, m0 = (v * keep for v in carry[i])
            raw = [xs[i][k] + _dot(hprev, R[i][k], prec) for k in range(4)]
            p = ps.pointwise(raw, c0, n0, m0)
            hs_r[g, t, :, c] = _bits(p["h1"])
            if saved:
                raw_r, cnm_r = saved
                for k in range(4):
                    raw_r[g, t, k, :, c] = raw[k]
                for k, name in enumerate(("c1", "n1", "m1")):
                    cnm_r[g, t, k, :, c] = p[name]
            out.append((p["h1"], p["c1"], p["n1"], p["m1"]))
        ahead = inputs(jnp.minimum(t + 1, T - 1)) if plan.prefetch else ahead  # issued before the wait
        return _sync(f_r, g, mine, t + 1, plan), ahead, tuple(out)

    first = inputs(0) if plan.prefetch else ()
    _, _, final = lax.fori_loop(0, T, step, (jnp.bool_(True), first, init))
    for i, c in enumerate(cols):
        for k in range(4):
            sT_r[g, k, :, c] = final[i][k]


def _bwd_kernel(raw_r, cnm_r, s0_r, k_r, dh_r, gT_r, R_r, dx0_r, f0_r, dx_r, d0_r, f_r, *ring, plan, T, g0):
    """``bwd_exchange="gates"``: each program reads every program's gate gradients (4 x bb x d
    words per step) and multiplies them by its (d, u) slice of R^T. ``"partials"``: each
    program multiplies its own gate gradients by its (u, d) rows of R^T and writes the
    (bb, d) partial sum to a two-slot ring; each then sums its u columns over the group's
    partials (bb x d words per step, read with volatile loads since the slots are reused)."""
    del dx0_r, f0_r  # aliased to dx_r, f_r
    g, head, mine, rows = _program(plan, g0)
    prec = plan.precision
    partials = bool(ring)

    def r_slices():  # gates: (d_out, u) columns of R^T; partials: (u, d_in) rows of R^T
        return [[R_r[head, k, r, :] if partials else R_r[head, k, :, r] for k in range(4)] for r in rows]

    Rt = r_slices() if plan.r_resident else None

    def recurrent(R, i, t, ok, slot):  # this slice of sum_g dgate_g(t) R_g^T
        if partials:
            from jax.experimental.pallas import triton as plt

            ref = ring[0].at[g, jnp.asarray(slot, jnp.int32), :, :, rows[i]]  # (splits, bb, u): every program's partial
            part = plt.load(ref, mask=jnp.broadcast_to(ok, ref.shape), other=0.0, volatile=not plan.interpret)
            return jnp.sum(part, axis=0)
        t = jnp.asarray(t, jnp.int32)  # (interpret mode's load rule wants array indices)
        dn = [_received(dx_r.at[g, t, jnp.int32(k)], ok, plan) for k in range(4)]
        return sum(_dot(dn[k], R[i][k], prec) for k in range(4))

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
        R = Rt if plan.r_resident else r_slices()
        t = T - 1 - j
        tn = jnp.minimum(t + 1, T - 1)
        keep, keep_n, per_slice = ahead if plan.prefetch else inputs(t)
        out, draws = [], []
        for i, r in enumerate(rows):
            dh_t, cnm_p, raw_t = per_slice[i]
            dh_rec = recurrent(R, i, tn, (t < T - 1) & ready, 1 - (j & 1))  # the other slot: step j - 1's
            dh1 = jnp.where(t == T - 1, gT_r[g, 0, :, r], keep_n * dh_rec) + dh_t
            c0, n0, m0 = (v * keep for v in cnm_p)
            p = ps.pointwise(list(raw_t), c0, n0, m0)
            draw, d_in = ps.adjoint(p, dh1, *carry[i])
            for k in range(4):
                dx_r[g, t, k, :, r] = _bits(draw[k])
            out.append(tuple(v * keep for v in d_in))
            draws.append(draw)
        if partials:  # after every slice read the other slot (interpret mode runs them in turn)
            for i, s in enumerate(mine):
                ring[0][g, j & 1, s] = sum(_dot(draws[i][k], R[i][k], prec) for k in range(4))
        ahead = inputs(jnp.maximum(t - 1, 0)) if plan.prefetch else ahead  # issued before the wait
        return _sync(f_r, g, mine, j + 1, plan), ahead, tuple(out)

    first = inputs(jnp.int32(T - 1)) if plan.prefetch else ()
    ready, _, final = lax.fori_loop(0, T, step, (jnp.bool_(True), first, init))
    keep0 = k_r[g, 0]
    R = Rt if plan.r_resident else r_slices()
    for i, r in enumerate(rows):
        d0_r[g, 0, :, r] = keep0 * recurrent(R, i, 0, ready, (T - 1) % 2)
        for k in range(3):
            d0_r[g, k + 1, :, r] = final[i][k]


def _launch(plan, kernel, ins, out_shapes, warps):
    """Run ``kernel`` over every group, ``plan.per_launch`` groups per launch. ``ins``:
    per-group arrays (leading axis = groups) and shared ones (wrapped in a tuple). Output 0
    is the exchange buffer (int32 words, filled with ``EMPTY`` first) and output 2 the
    group counters / flags (zeros); both come in as the last two inputs, aliased."""
    from jax.experimental.pallas import triton as plt

    outs = []
    for g0 in range(0, plan.groups, plan.per_launch):
        n = min(plan.per_launch, plan.groups - g0)
        args = [a[0] if isinstance(a, tuple) else a[g0:g0 + n] for a in ins]
        flags = jnp.zeros((n, 1), jnp.int32) if plan.spin != "flags" else jnp.zeros((n, plan.splits), F32)
        shapes = [jax.ShapeDtypeStruct((n, *s[1:]), d) for s, d in out_shapes]
        shapes.insert(2, jax.ShapeDtypeStruct(flags.shape, flags.dtype))
        empty = jnp.full(shapes[0].shape, EMPTY, jnp.int32)
        kw = {} if plan.interpret else {"compiler_params": plt.CompilerParams(num_warps=warps, num_stages=1)}
        res = pl.pallas_call(
            functools.partial(kernel, g0=g0), grid=(n, 1 if plan.interpret else plan.splits), out_shape=shapes,
            input_output_aliases={len(args): 0, len(args) + 1: 2}, interpret=plan.interpret, **kw,
        )(*args, empty, flags)
        outs.append([o for k, o in enumerate(res) if k != 2])
    return [jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0] for parts in zip(*outs)]


# ----------------------------------------------------------------------------- layouts


def _groups(a, plan, batch_axis, head_axis):
    """(..., batch, ..., heads, ...) -> (heads x batch blocks, ...) with the batch block
    in place of the batch axis (padded) and the head axis dropped."""
    a = _pad(a, batch_axis, plan.bp)
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
    a = _pad(jnp.stack([s.astype(F32) for s in states]), 3, plan.d)  # (4, B, H, d)
    return jnp.moveaxis(_groups(a, plan, 1, 2), 1, 2)


def _state_out(a, plan, heads, B, D):
    """(groups, 4, bb, d) -> 4 arrays (B, H, D)."""
    a = _ungroup(a, plan, heads, 2)  # (H, bp, 4, d)
    return tuple(jnp.transpose(a[:, :B, k, :D], (1, 0, 2)) for k in range(4))


def forward(x, R, b, state, keep, *, save, interpret):
    """h (B, T, H, D), the final state and, with ``save``, what the backward needs."""
    B, T, _, H, D = x.shape
    plan = Plan(B, H, D, {}, interpret)
    d = plan.d
    pre = _pad((x + b[None, None]).astype(F32), 4, d)  # (B, T, 4, H, d)
    xg = jnp.moveaxis(_groups(pre, plan, 0, 3), 1, 3)  # (G, T, 4, bb, d)
    Rs = _pad(_pad(jnp.transpose(R.astype(F32), (0, 2, 1, 3)), 2, d), 3, d)  # (H, 4, d_in, d_out)
    s0 = _state_in(state, plan)  # (G, 4, bb, d)
    kp = jnp.ones((B, T), F32) if keep is None else keep.astype(F32)
    kb = jnp.transpose(_pad(kp, 0, plan.bp).reshape(plan.nb, plan.bb, T), (0, 2, 1))[..., None]
    kg = jnp.tile(kb, (H, 1, 1, 1))  # (G, T, bb, 1), groups head-major
    G, bb = plan.groups, plan.bb
    out_shapes = [((G, T, bb, d), jnp.int32), ((G, 4, bb, d), F32)]
    if save:
        out_shapes += [((G, T, 4, bb, d), F32), ((G, T, 3, bb, d), F32)]
    kernel = functools.partial(_fwd_kernel, plan=plan, T=T)
    hs, sT, *rest = _launch(plan, kernel, [xg, (Rs,), s0, kg], out_shapes, plan.warps["fwd"])
    hs = lax.bitcast_convert_type(hs, F32)
    h = jnp.transpose(_ungroup(hs, plan, H, 2), (1, 2, 0, 3))[:B, :, :, :D]  # (B, T, H, D)
    final = _state_out(sT, plan, H, B, D)
    saved = (Rs, s0, kg, hs, *rest) if save else None
    return h, final, saved


def backward(shape, saved, dh, dfinal, *, interpret):
    """Gradients (dx, dR, db, dstate0) in the op's layouts."""
    B, T, _, H, D = shape
    plan = Plan(B, H, D, {}, interpret)
    Rs, s0, kg, hs, raw, cnm = saved
    d = plan.d
    dhg = jnp.moveaxis(_groups(_pad(dh.astype(F32), 3, d), plan, 0, 2), 1, 2)  # (G, T, bb, d)
    gT = _state_in(dfinal, plan)
    G, bb = plan.groups, plan.bb
    kernel = functools.partial(_bwd_kernel, plan=plan, T=T)
    RsT = jnp.swapaxes(Rs, 2, 3)  # (H, 4, d_out, d_in): the backward's slices need no transpose on chip
    out_shapes = [((G, T, 4, bb, d), jnp.int32), ((G, 4, bb, d), F32)]
    if plan.bwd_exchange == "partials":
        out_shapes.append(((G, 2, plan.splits, bb, d), F32))  # the ring of partial sums (scratch)
    dx, d0, *_ = _launch(plan, kernel, [raw, cnm, s0, kg, dhg, gT, (RsT,)], out_shapes, plan.warps["bwd"])
    dx = lax.bitcast_convert_type(dx, F32)
    # dR and db: sums over (batch, time) of the step's input state times its gate gradients
    hprev = jnp.concatenate([s0[:, None, 0], hs[:, :-1]], axis=1) * kg  # (G, T, bb, d)
    hp = hprev.reshape(H, plan.nb, T, bb, d)
    dxh = dx.reshape(H, plan.nb, T, 4, bb, d)
    dR = jnp.einsum("hjtbi,hjtkbo->hiko", hp, dxh, precision=plan.dr_precision)[:, :D, :, :D]
    db = jnp.transpose(jnp.sum(dxh, axis=(1, 2, 4)), (1, 0, 2))[:, :, :D]  # (4, H, D)
    dxo = jnp.transpose(_ungroup(dx, plan, H, 3), (1, 2, 3, 0, 4))[:B, :, :, :, :D]  # (B, T, 4, H, D)
    return dxo, dR, db, _state_out(d0, plan, H, B, D)
