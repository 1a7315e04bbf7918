"""xLSTM kernel benchmarks on the accelerator (issue 9): mLSTM and sLSTM, every backend.

    python benchmarks/kernels_xlstm.py [--ops mlstm,slstm,slstm_stages] [--quick] [--slstm_configs bwd_warps=1,...]

Pallas GPU settings are kernel configurations (``mnemax.kernels.MLSTMConfig``,
``mnemax.kernels.SLSTMConfig``) passed to the ops' ``config=``; each row names the fields
it changes.

mLSTM, forward and forward+backward, bf16 inputs, 65,536 tokens per call, 8 heads,
d_qk 256, d_v 512, at context 8k (batch 8) and 64k (batch 1), against

* our ``xla`` chunkwise backend,
* cuDNN attention (``jax.nn.dot_product_attention(..., implementation="cudnn")``,
  causal) at the same tokens and heads, d_qk 256 and d_v 256 (``dot_product_attention``
  needs d_v == d_qk: less work for attention than d_v 512; the row says so),
* NX-AI's ``mlstm_kernels`` chunkwise Triton kernel (``chunkwise--triton_xl_chunk``) in
  PyTorch on the same GPU, run in a subprocess of this command before JAX takes the
  device memory.

sLSTM, forward+backward, batch 16, time 2048, d 1024 (4 heads of 256): the fused
Pallas kernel against the ``xla`` lax.scan.

Each row: median time, TFLOP/s achieved (the chunkwise algorithm's matmul FLOPs for
mLSTM: per (batch, head) ``2 T L (d_qk + d_v) + 4 T d_qk d_v`` forward with chunk ``L``,
the backward counted as twice the forward; ``2 T^2 (d_qk + d_v)`` halved for causal
attention; the recurrent matmul ``2 * 4 d^2 / heads`` per token for sLSTM), the ratio
to the bf16 tensor-core rate measured in the same run, and speedups. JSON to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback

COLUMNS = ["op", "shape", "impl", "fwd_ms", "fwd_save_ms", "bwd_ms", "bwd_dx_ms", "fwdbwd_ms", "fwdbwd_TFLOPs", "x_peak", "rel_err", "grad_rel_err", "vs_xla", "vs_mlstm_kernels",
           "vs_cudnn", "note", "error"]
MLSTM_SHAPES = [(8, 8, 8192, 256, 512), (1, 8, 65536, 256, 512)]  # (batch, heads, time, d_qk, d_v)
SLSTM_SHAPE = (16, 2048, 4, 256)  # batch, time, heads, head_dim (d = 1024)
CHUNK = 64


def mlstm_flops(b, h, t, dk, dv, L=CHUNK):
    fwd = b * h * (2 * t * L * (dk + dv) + 4 * t * dk * dv)
    return fwd, 3 * fwd


def attention_flops(b, h, t, dk, dv):
    fwd = b * h * t * t * (dk + dv)  # 2 T^2 (dk + dv), halved by the causal mask
    return fwd, 3 * fwd


# mlstm_kernels variants tried in order, each in its own process (a Triton compiler crash
# aborts the process): (kernel, chunk size, environment). DISABLE_LLVM_OPT=1 skips
# Triton's LLVM -O3 pipeline, where 2.0.6's xl_chunk kernel hit an SLPVectorizer assertion
# under Triton 3.6 on the H200.
TORCH_VARIANTS = [("chunkwise--triton_xl_chunk", 128, {}), ("chunkwise--triton_xl_chunk", 128, {"DISABLE_LLVM_OPT": "1"}),
                  ("chunkwise--triton_limit_chunk", 64, {})]


def _torch_tag(name: str, chunk: int, no_llvm_opt: bool) -> str:
    return f"mlstm_kernels({name.split('--')[-1]},L={chunk}{',no_llvm_opt' if no_llvm_opt else ''})"


def torch_rows(shapes, name="chunkwise--triton_xl_chunk", chunk=128) -> list[dict]:
    """mlstm_kernels' chunkwise Triton kernel, fwd and fwd+bwd, CUDA events."""
    import torch
    from mlstm_kernels.torch import get_mlstm_kernel

    kern = get_mlstm_kernel(name)
    tag = _torch_tag(name, chunk, bool(os.environ.get("DISABLE_LLVM_OPT")))
    rows = []
    for b, h, t, dk, dv in shapes:
        shape = str((b, h, t, dk, dv))
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
            q, k, v = mk(b, h, t, dk), mk(b, h, t, dk), mk(b, h, t, dv)
            i, f = mk(b, h, t), mk(b, h, t) + 3.0
            for x in (q, k, v, i, f):
                x.requires_grad_(True)
            dh = mk(b, h, t, dv)

            def fwd():
                with torch.no_grad():
                    return kern(q, k, v, i, f, chunk_size=chunk)

            def fwdbwd():
                out = kern(q, k, v, i, f, chunk_size=chunk)
                out.backward(dh)

            times = {}
            for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                for _ in range(2):
                    fn()
                torch.cuda.synchronize()
                meds = []
                for _ in range(5):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    for _ in range(3):
                        fn()
                    e.record()
                    torch.cuda.synchronize()
                    meds.append(s.elapsed_time(e) / 3)
                times[name] = sorted(meds)[len(meds) // 2]
            rows.append({"op": "mlstm", "shape": shape, "impl": tag, "chunk": chunk,
                         "fwd_ms": times["fwd"], "fwdbwd_ms": times["fwdbwd"]})
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"op": "mlstm", "shape": shape, "impl": tag, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


def torch_results(shapes) -> list[dict]:
    """Runs TORCH_VARIANTS in subprocesses until every shape has a timing; returns every
    row (failed variants as error rows, so the table says what was tried)."""
    out = os.path.join(os.environ.get("OUT") or ".", "mlstm_kernels_torch.json")
    rows, todo = [], list(shapes)
    for name, chunk, env in TORCH_VARIANTS:
        tag = _torch_tag(name, chunk, "DISABLE_LLVM_OPT" in env)
        try:
            if os.path.exists(out):
                os.remove(out)
            subprocess.run([sys.executable, __file__, "--torch", json.dumps(todo), out, name, str(chunk)], check=True,
                           timeout=300, env={**os.environ, **env})
            with open(out) as fh:
                got = json.load(fh)
        except Exception as e:  # noqa: BLE001
            got = [{"op": "mlstm", "shape": "all", "impl": tag, "error": f"{type(e).__name__}: {str(e)[:200]}"}]
        print(got, flush=True)
        rows += got
        done = {r["shape"] for r in got if r.get("fwdbwd_ms")}
        todo = [s for s in todo if str(tuple(s)) not in done]
        if not todo:
            break
    return rows


def _time(fn, *args):
    from common import bench

    return bench(fn, *args, calls=3, repeats=5, warmup=1)


def mlstm_config(backend: str, fields: dict):
    """The ``config=`` of an mLSTM row: an MLSTMConfig with ``fields`` for the Pallas GPU
    backend, None for the others."""
    from mnemax.kernels import MLSTMConfig

    return MLSTMConfig(**fields) if backend == "pallas_gpu" else None


def _attempt(row, fn):
    """``fn()``; an exception becomes the row's ``error`` (the benchmark goes on). Prints the row."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return None
    finally:
        print(row, flush=True)


def _rel(a, b) -> float:
    """Relative error of ``a`` against ``b`` in the 2-norm."""
    import jax.numpy as jnp

    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _measure(row, fwd, fb, args, ref, flops, peak):
    """Fills ``row`` with the errors against ``ref`` (None: this is the reference): the
    output's (``rel_err``) and the largest over the inputs' gradients (``grad_rel_err``),
    relative in the 2-norm; then the forward and forward+backward times and the achieved
    rate. Returns (output, gradients) in float32, the next rows' ``ref``."""
    import jax.numpy as jnp

    out = fwd(*args).astype(jnp.float32)
    grads = [g.astype(jnp.float32) for g in fb(*args)]
    ref_out, ref_grads = (out, grads) if ref is None else ref
    row["rel_err"] = _rel(out, ref_out)
    errs = [_rel(a, b) for a, b in zip(grads, ref_grads)]
    row["grad_rel_err"] = max(errs)
    row["grad_errs"] = " ".join(f"{e:.2g}" for e in errs)  # per input, in argument order
    ref = (out, grads)
    row["fwd_ms"] = _time(fwd, *args) * 1e3
    row["fwdbwd_ms"] = _time(fb, *args) * 1e3
    row["fwdbwd_TFLOPs"] = flops / row["fwdbwd_ms"] / 1e9
    row["x_peak"] = row["fwdbwd_TFLOPs"] * 1e12 / peak
    return ref


def mlstm_variants(xla_chunks: str, pallas_configs: str) -> list[tuple]:
    """(row name, backend, MLSTMConfig fields, chunk size): ``xla`` and ``pallas_gpu`` at
    chunk 64 and the defaults, then each extra xla chunk size and each extra Pallas
    configuration ``block_v:num_warps[:chunk[:state_block[:state_warps]]][+field=value...]``."""
    out = [("xla", "xla", {}, CHUNK), ("pallas_gpu", "pallas_gpu", {}, CHUNK)]
    for c in filter(None, xla_chunks.split(",")):
        out.append((f"xla(L={c})", "xla", {}, int(c)))
    for cfg in filter(None, pallas_configs.split(",")):
        out.append(pallas_variant(cfg))
    return out


def pallas_variant(cfg: str) -> tuple:
    """``block_v:num_warps[:chunk[:state_block[:state_warps]]][+field=value...]`` ->
    (row name, "pallas_gpu", MLSTMConfig fields, chunk size); the ``+`` fields are any other
    MLSTMConfig fields (e.g. ``+dv=fused+block_k=256``)."""
    cfg, *extra = cfg.split("+")
    cfg, _, bwd = cfg.partition("/")
    if bwd:
        raise ValueError(f"--pallas_configs {cfg}/{bwd}: the backward variants were removed (one backward is "
                         f"left, the former 'split'; benchmarks/RESULTS.md has the figures): drop the /{bwd}")
    bv, w, *rest = (int(x) for x in cfg.split(":"))
    L = rest[0] if rest else CHUNK
    opts, name = {"block_v": bv, "num_warps": w}, f"bv={bv},w={w},L={L}"
    if len(rest) > 1:  # the state walk's tile and warps
        opts.update(state_block=rest[1], state_warps=rest[2] if len(rest) > 2 else 4)
        name += f",sb={rest[1]},sw={opts['state_warps']}"
    for kv in extra:
        k, _, v = kv.partition("=")
        opts[k] = int(v) if v.isdigit() else v
        name += f",{k}={v}"
    return (f"pallas_gpu({name})", "pallas_gpu", opts, L)


def mlstm_rows(peak: float, quick: bool, xla_chunks: str = "", pallas_configs: str = "", cudnn: bool = True) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mnemax.kernels.mlstm import mlstm

    variants = mlstm_variants(xla_chunks, pallas_configs)

    shapes = [(1, 2, 1024, 64, 128)] if quick else MLSTM_SHAPES
    rows = []
    torch_rows_ = torch_results(shapes)  # before JAX allocates on the device
    rng = np.random.default_rng(0)
    for b, h, t, dk, dv in shapes:
        shape = str((b, h, t, dk, dv))
        mk = lambda *s, off=0.0: jnp.asarray(rng.standard_normal(s, np.float32) + off, jnp.bfloat16)  # noqa: E731
        q, k, v, i, f, dh = mk(b, h, t, dk), mk(b, h, t, dk), mk(b, h, t, dv), mk(b, h, t), mk(b, h, t, off=3.0), mk(b, h, t, dv)
        ref = None
        here = [r for r in torch_rows_ if r.get("shape") in (shape, "all")]
        # cuDNN attention at d_v = d_qk: jax's dot_product_attention needs equal head dims.
        row = {"op": "mlstm", "shape": shape, "impl": f"cudnn_attention(d_v={dk})",
               "note": "jax attention needs d_v == d_qk: attention at d_v = d_qk, less work than the mLSTM's d_v"}

        def attention(row=row):
            qa, ka = (jnp.swapaxes(a, 1, 2) for a in (q, k))  # (B, T, H, D)
            va, dha = jnp.swapaxes(v[..., :dk], 1, 2), jnp.swapaxes(dh[..., :dk], 1, 2)
            att = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # noqa: E731
            fwd = jax.jit(att)
            fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(att(q, k, v).astype(jnp.float32) * dha), argnums=(0, 1, 2)))
            row["fwd_ms"] = _time(fwd, qa, ka, va) * 1e3
            row["fwdbwd_ms"] = _time(fb, qa, ka, va) * 1e3
            row["fwdbwd_TFLOPs"] = attention_flops(b, h, t, dk, dk)[1] / row["fwdbwd_ms"] / 1e9
            row["x_peak"] = row["fwdbwd_TFLOPs"] * 1e12 / peak

        if cudnn:
            _attempt(row, attention)
            here.append(row)
        for impl, backend, opts, chunk in variants:
            row = {"op": "mlstm", "shape": shape, "impl": impl}

            cfg = mlstm_config(backend, opts)

            def loss(q, k, v, i, f, be=backend, L=chunk, cfg=cfg):
                return jnp.sum(mlstm(q, k, v, i, f, backend=be, chunk_size=L, config=cfg)[0].astype(jnp.float32) * dh)

            fwd = jax.jit(lambda q, k, v, i, f, be=backend, L=chunk, cfg=cfg: mlstm(q, k, v, i, f, backend=be, chunk_size=L,
                                                                                  config=cfg)[0])
            fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            out = _attempt(row, lambda row=row, fwd=fwd, fb=fb, L=chunk: _measure(
                row, fwd, fb, (q, k, v, i, f), ref, mlstm_flops(b, h, t, dk, dv, L)[1], peak))
            ref = out if ref is None else ref
            here.append(row)
        times = {r["impl"]: r.get("fwdbwd_ms") for r in here if r.get("fwdbwd_ms")}
        mk_t = next((v_ for k_, v_ in times.items() if k_.startswith("mlstm_kernels")), None)
        cu_t = next((v_ for k_, v_ in times.items() if k_.startswith("cudnn")), None)
        for r in here:
            if r.get("fwdbwd_ms"):
                r["vs_xla"] = times.get("xla", float("nan")) / r["fwdbwd_ms"]
                r["vs_mlstm_kernels"] = (mk_t or float("nan")) / r["fwdbwd_ms"]
                r["vs_cudnn"] = (cu_t or float("nan")) / r["fwdbwd_ms"]
            if r["impl"].startswith("mlstm_kernels") and r.get("fwdbwd_ms"):
                r["fwdbwd_TFLOPs"] = mlstm_flops(b, h, t, dk, dv, r.get("chunk", 128))[1] / r["fwdbwd_ms"] / 1e9
                r["x_peak"] = r["fwdbwd_TFLOPs"] * 1e12 / peak
        rows += here
    return rows


def mlstm_stage_rows(peak: float, quick: bool, pallas_configs: str = "") -> list[dict]:
    """The Pallas GPU mLSTM's stages timed one by one (forward: gate scalars, state walk,
    forward total; backward: the adjoint part (adjoint walk and stabiliser scans), the
    dq/dk/gates kernel, the dv kernel, backward total), for the default MLSTMConfig and
    each of ``pallas_configs`` (see pallas_variant), so the table says where the time goes.
    Each stage is jitted alone on inputs produced by the previous."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mnemax.kernels.mlstm import common as pm
    from mnemax.kernels.mlstm import gpu

    rows = []
    configs = [("pallas_gpu", {}, CHUNK)] + [(n, o, L) for n, _, o, L in map(pallas_variant, filter(None, pallas_configs.split(",")))]
    rng = np.random.default_rng(0)
    for b, h, t, dk, dv in ([(1, 2, 1024, 64, 128)] if quick else MLSTM_SHAPES):
        mk = lambda *s, off=0.0: jnp.asarray(rng.standard_normal(s, np.float32) + off, jnp.bfloat16)  # noqa: E731
        q, k, v, dh = mk(b, h, t, dk), mk(b, h, t, dk), mk(b, h, t, dv), mk(b, h, t, dv)
        i, f = (jnp.asarray(rng.standard_normal((b, h, t)), jnp.float32) + o for o in (0.0, 3.0))
        shape = str((b, h, t, dk, dv))
        for name, opts, L in configs:
            try:
                rows += _stages(jax, jnp, pm, gpu, q, k, v, i, f, dh, L, shape, name, mlstm_config("pallas_gpu", opts))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append({"op": "mlstm stages", "shape": shape, "impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


def _stages(jax, jnp, pm, gpu, q, k, v, i, f, dh, L, shape, name, config):
    """The stage rows of one MLSTMConfig."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    p = pm.make_problem("gpu", q, k, v, i, f, None, L)
    arrays, static = tuple(p[:5]), tuple(p[5:])  # the ints stay static under jit
    P = lambda arrs: pm.Problem(*arrs, *static)  # noqa: E731
    BH = b * h
    st0 = (jnp.zeros((BH, p.d_qk, p.d_v), jnp.float32), jnp.zeros((BH, 1, p.d_qk), jnp.float32),
           jnp.zeros((BH, 1, 1), jnp.float32))
    interpret = jax.default_backend() == "cpu"  # a dry run of the script on CPU (--quick)
    kw = dict(scale=dk**-0.5, eps=1e-6, config=config, interpret=interpret)
    scal = jax.jit(lambda arrs: gpu.chunk_scalars(P(arrs), st0[2][:, 0, 0]))
    walk = jax.jit(lambda arrs, x, y, w_a, c: gpu.walk(P(arrs), x, y, gpu.coefs(w_a, c, c), st0[0], st0[1], reverse=False,
                                                       state_dtype=x.dtype, config=config, interpret=interpret))
    fwd = jax.jit(lambda arrs: gpu.forward(P(arrs), st0, q.dtype, save=True, **kw))
    bwd = jax.jit(lambda arrs, dh, bounds: gpu.backward(P(arrs), dh, bounds, st0, **kw))
    adj = jax.jit(lambda arrs, dh, bounds: gpu.adjoint(P(arrs), dh, bounds, st0, **kw))
    dqk = jax.jit(lambda arrs, dh, Cs, ns, m4, dCs, dns, gme, rows: gpu.gpu_dqk(P(arrs), dh, Cs, ns, m4, dCs, dns, gme, rows,
                                                                               **kw))
    dvk = jax.jit(lambda arrs, dh, ns, m4, dCs: gpu.gpu_dv(P(arrs), dh, ns, m4, dCs, **kw))
    dh_p = pm.pad_axis(dh.reshape(BH, t, dv), 1, p.n_chunks * p.L)
    _, _, w_a, c = scal(arrays)
    bounds = tuple(fwd(arrays)[4:])
    stages = [("gate scalars (xla)", scal, (arrays,)), ("state walk", walk, (arrays, p.k, p.v, w_a, c)),
              ("forward total", fwd, (arrays,)), ("backward total", bwd, (arrays, dh_p, bounds))]
    dCs, dns, _, _, _, gm_end, rowstats = adj(arrays, dh_p, bounds)
    Cs, ns, m4 = bounds[:3]
    dv_fused = gpu.dv_mode(p, config) == "fused"  # "auto" resolved as the backward resolves it
    stages += [("bwd: adjoint walk + scans", adj, (arrays, dh_p, bounds)),
               ("bwd: dq/dk/gates kernel" + (" (+dv)" if dv_fused else ""), dqk,
                (arrays, dh_p, Cs, ns, m4, dCs, dns, gm_end, rowstats))]
    if not dv_fused:
        stages.append(("bwd: dv kernel", dvk, (arrays, dh_p, ns, m4, dCs)))
    rows = []
    for stage, fn, args in stages:
        rows.append({"op": "mlstm stages", "shape": shape, "impl": f"{name}: {stage}", "fwd_ms": _time(fn, *args) * 1e3})
        print(rows[-1], flush=True)
    return rows


def mlstm_check_rows(peak: float, quick: bool, pallas_configs: str = "") -> list[dict]:
    """Accuracy at d_qk 256 / d_v 512 on a shorter sequence, where a float32 reference is
    cheap: bf16 inputs, the reference is the quadratic ``parallel`` form in float32 on the
    same (rounded) inputs at "highest" matmul precision; for ``xla`` (bf16), the Pallas GPU
    defaults and each of ``pallas_configs``: the output's and each input's gradient's
    relative 2-norm error."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mnemax.kernels.mlstm import mlstm

    b, h, t, dk, dv = (1, 2, 256, 64, 128) if quick else (2, 4, 2048, 256, 512)
    rng = np.random.default_rng(2)
    mk = lambda *s, off=0.0: jnp.asarray(rng.standard_normal(s, np.float32) + off, jnp.bfloat16)  # noqa: E731
    args = (mk(b, h, t, dk), mk(b, h, t, dk), mk(b, h, t, dv), mk(b, h, t), mk(b, h, t, off=3.0))
    dh = jnp.asarray(rng.standard_normal((b, h, t, dv), np.float32))

    def value_and_grads(backend, xs, L=CHUNK, config=None):
        def loss(*a):
            return jnp.sum(mlstm(*a, backend=backend, chunk_size=L, config=config)[0].astype(jnp.float32) * dh)

        out = jax.jit(lambda *a: mlstm(*a, backend=backend, chunk_size=L, config=config)[0])(*xs).astype(jnp.float32)
        return out, [g.astype(jnp.float32) for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*xs)]

    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = value_and_grads("parallel", tuple(a.astype(jnp.float32) for a in args))
    shape = str((b, h, t, dk, dv))
    variants = [("xla", "xla", {}, CHUNK), ("pallas_gpu", "pallas_gpu", {}, CHUNK)]
    variants += [pallas_variant(c) for c in filter(None, pallas_configs.split(","))]
    rows = []
    for name, backend, opts, L in variants:
        row = {"op": "mlstm accuracy (vs fp32 parallel)", "shape": shape, "impl": name}

        def check(row=row, backend=backend, opts=opts, L=L):
            out, grads = value_and_grads(backend, args, L, mlstm_config(backend, opts))
            row["rel_err"] = _rel(out, ref_out)
            for gname, g, r in zip(("dq", "dk", "dv", "di", "df"), grads, ref_grads):
                row[f"{gname}_err"] = _rel(g, r)
            row["grad_rel_err"] = max(row[f"{g}_err"] for g in ("dq", "dk", "dv", "di", "df"))

        _attempt(row, check)
        rows.append(row)
    return rows


def slstm_variants(configs: str) -> list[tuple]:
    """(row name, backend, SLSTMConfig fields, float32 dots?): the xla
    backend at float32 dot precision (the accuracy reference) and at JAX's default (the
    timing baseline), the Pallas defaults, then each ``key=value+key=value`` config."""
    out = [("xla (f32 dots)", "xla", {}, True), ("xla", "xla", {}, False), ("pallas_gpu", "pallas_gpu", {}, False)]
    for cfg in filter(None, configs.split(",")):
        opts = {}
        for kv in cfg.split("+"):
            k, _, v = kv.partition("=")
            opts[k] = int(v) if v.lstrip("-").isdigit() else v
        out.append((f"pallas_gpu {cfg}", "pallas_gpu", opts, False))
    return out


def slstm_rows(peak: float, quick: bool, pallas_configs: str = "") -> list[dict]:
    import contextlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mnemax.kernels import SLSTMConfig
    from mnemax.kernels.slstm import slstm

    b, t, h, d = (2, 64, 2, 32) if quick else SLSTM_SHAPE
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((b, t, 4, h, d), np.float32), jnp.bfloat16)
    R = jnp.asarray(rng.standard_normal((h, d, 4, d), np.float32) / np.sqrt(d))
    bias = jnp.zeros((4, h, d), jnp.float32)
    gy = jnp.asarray(rng.standard_normal((b, t, h, d), np.float32))
    flops = 3 * b * t * 2 * 4 * d * d * h
    rows, ref = [], None
    for name, backend, opts, exact in slstm_variants(pallas_configs):
        row = {"op": "slstm", "shape": str((b, t, h * d, h)), "impl": name}

        def run(row=row, backend=backend, opts=opts, exact=exact):
            cfg = SLSTMConfig(**opts) if backend == "pallas_gpu" else None
            fwd = jax.jit(lambda x, R, bias: slstm(x, R, bias, backend=backend, config=cfg)[0])
            fb = jax.jit(jax.grad(lambda x, R, bias: jnp.sum(slstm(x, R, bias, backend=backend, config=cfg)[0]
                                                             .astype(jnp.float32) * gy), argnums=(0, 1, 2)))
            with jax.default_matmul_precision("highest") if exact else contextlib.nullcontext():
                return _measure(row, fwd, fb, (x, R, bias), ref, flops, peak)

        out = _attempt(row, run)
        ref = out if ref is None else ref
        rows.append(row)
    base = rows[1].get("fwdbwd_ms")  # the xla backend at default precision
    for r in rows:
        if base and r.get("fwdbwd_ms"):
            r["vs_xla"] = base / r["fwdbwd_ms"]
    return rows


def slstm_stage_rows(peak: float, quick: bool, pallas_configs: str = "") -> list[dict]:
    """The Pallas GPU sLSTM kernels' stages at SLSTM_SHAPE, float32 inputs: forward without
    and with saving the backward's inputs, the backward (kernel plus XLA's dR / db), and the
    backward's gate gradients alone; for the defaults and each ``key=value+...`` config."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mnemax.kernels import SLSTMConfig
    from mnemax.kernels.slstm import gpu as pg
    from mnemax.kernels.slstm import initial_state

    B, T, H, D = (2, 64, 2, 32) if quick else SLSTM_SHAPE
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, T, 4, H, D), np.float32))
    R = jnp.asarray(rng.standard_normal((H, D, 4, D), np.float32) / np.sqrt(D))
    b = jnp.zeros((4, H, D), jnp.float32)
    st = tuple(initial_state(B, H, D))
    dh = jnp.asarray(rng.standard_normal((B, T, H, D), np.float32))
    dfin = tuple(jnp.zeros((B, H, D)) for _ in range(4))
    interpret = jax.default_backend() != "gpu"
    rows = []
    for name, _, opts, _ in [v for v in slstm_variants(pallas_configs) if v[1] == "pallas_gpu"]:
        row = {"op": "slstm_stages", "shape": str((B, T, H * D, H)), "impl": name}

        def run(row=row, opts=opts):
            cfg = SLSTMConfig(**opts)
            f0 = jax.jit(lambda x, R, b, st: pg.forward(x, R, b, st, None, config=cfg, save=False, interpret=interpret)[0])
            row["fwd_ms"] = _time(f0, x, R, b, st) * 1e3
            f1 = jax.jit(lambda x, R, b, st: pg.forward(x, R, b, st, None, config=cfg, save=True, interpret=interpret)[2])
            saved = f1(x, R, b, st)
            row["fwd_save_ms"] = _time(f1, x, R, b, st) * 1e3
            fb = jax.jit(lambda s, dh, df: pg.backward((B, T, 4, H, D), s, dh, df, config=cfg, interpret=interpret))
            row["bwd_ms"] = _time(fb, saved, dh, dfin) * 1e3
            fk = jax.jit(lambda s, dh, df: pg.backward((B, T, 4, H, D), s, dh, df, config=cfg, interpret=interpret)[0])
            row["bwd_dx_ms"] = _time(fk, saved, dh, dfin) * 1e3

        _attempt(row, run)
        rows.append(row)
    return rows


SECTIONS = {"mlstm": mlstm_rows, "slstm": slstm_rows, "slstm_stages": slstm_stage_rows, "mlstm_stages": mlstm_stage_rows, "mlstm_check": mlstm_check_rows}


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "--torch":
        rows = torch_rows([tuple(s) for s in json.loads(sys.argv[2])], sys.argv[4], int(sys.argv[5]))
        with open(sys.argv[3], "w") as fh:
            json.dump(rows, fh)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import environment, matmul_rate, save, table

    p = argparse.ArgumentParser()
    p.add_argument("--ops", default="mlstm,slstm")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--xla_chunks", default="", help="extra chunk sizes for the xla mLSTM rows, e.g. 128,256")
    p.add_argument("--pallas_configs", default="",
                   help="extra Pallas GPU mLSTM settings block_v:num_warps[:chunk[:state_block[:state_warps]]]"
                        "[+field=value...] (MLSTMConfig fields), e.g. 64:4,128:8,64:8:128:32:4,64:4+dqk_stages=2")
    p.add_argument("--stage_configs", default="", help="Pallas settings (as --pallas_configs) whose stages "
                   "--ops mlstm_stages times besides the defaults")
    p.add_argument("--slstm_configs", default="", help="extra Pallas GPU sLSTM settings (SLSTMConfig fields), "
                   "e.g. bwd_warps=1,splits=8+fwd_warps=8,precision=tf32x3")
    p.add_argument("--no_cudnn", action="store_true", help="skip the cuDNN attention rows of --ops mlstm")
    p.add_argument("--shapes", default="", help="which mLSTM shapes (indices into MLSTM_SHAPES, e.g. 0): default all")
    args = p.parse_args()
    if args.shapes:
        MLSTM_SHAPES[:] = [MLSTM_SHAPES[int(j)] for j in args.shapes.split(",")]
    env = environment()
    print(env, flush=True)
    peak = matmul_rate()
    print(f"bf16 matmul: {peak / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for op in args.ops.split(","):
        extra = ({"xla_chunks": args.xla_chunks, "pallas_configs": args.pallas_configs, "cudnn": not args.no_cudnn}
                 if op == "mlstm"
                 else {"pallas_configs": args.stage_configs} if op in ("mlstm_stages", "mlstm_check")
                 else {"pallas_configs": args.slstm_configs})  # slstm, slstm_stages
        rows += SECTIONS[op](peak, args.quick, **extra)
        save({"env": env, "matmul_flops": peak, "rows": rows}, "kernels_xlstm.json")
        print(table(rows, COLUMNS), flush=True)
    print("\n" + table(rows, COLUMNS))


if __name__ == "__main__":
    main()
