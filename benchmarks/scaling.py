"""Multi-device scaling of the sharded trainer (issues 10 and 11).

    python benchmarks/scaling.py --models xlstm-1.3b,mamba-1.4b \\
        --meshes data=8 fsdp=8 data=2,fsdp=4 fsdp=4,tensor=2 --batch 16 --seq 2048 --steps 20
    python benchmarks/scaling.py --tiny          # the same on 8 simulated CPU devices

For each model it runs the trainer (``mnemax.train.Trainer``: MQAR data, AdamW, bf16
compute, ``--remat`` blocks) with the same global batch on one device and on each mesh,
for ``--warmup`` + ``--steps`` steps, and reports per mesh: tokens/s over the timed
steps (median of per-step rates), MFU (6 * params * tokens/s over the bf16 matmul rate
measured here, times the device count), peak memory per device, the scaling efficiency
(tokens/s / (devices x the one-device tokens/s)) and the largest relative difference of
its loss curve from the one-device run. Then it restores the first mesh's final
checkpoint on one device and on a different mesh and evaluates it: the held-out loss
must equal the one the run reported (``restore_*_rel_diff``).

Each run (and each restore) is its own process, so the peak memory is that run's;
``--baseline FILE`` reuses the one-device runs saved in an earlier ``--out`` (to split a
long comparison over several commands), ``--no-restore`` skips the restores.

``--tiny`` shrinks every model to d_model 64, 2 layers (xLSTM: 4) (vocabulary of the task) and
simulates 8 CPU devices: a check of the whole path, not a speed measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

if "--tiny" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, matmul_rate, save, table  # noqa: E402

TINY = {"d_model": 64, "n_layers": 2}
COLUMNS = ["model", "mesh", "devices", "params_M", "tokens_per_s", "efficiency", "MFU", "peak_GB_per_device",
           "loss_max_rel_diff", "final_loss", "eval_loss", "error"]


def mesh_name(mesh: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"


def parse_mesh(spec: str) -> dict:
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    for kv in filter(None, spec.split(",")):
        k, _, v = kv.partition("=")
        if k not in mesh:
            raise ValueError(f"--meshes: unknown axis {k!r} in {spec!r}; expected data, fsdp, tensor")
        mesh[k] = int(v)
    return mesh


def make_config(model: str, mesh: dict, args, data_dir: str, steps: int):
    from mnemax.configs.base import base_config

    c = base_config()
    c.model.preset = model
    # tiny xLSTM: (mLSTM, sLSTM) twice, so the scanned path runs two groups
    tiny = {**TINY, **({"n_layers": 4, "slstm_at": (1, 3)} if model.startswith("xlstm") else {})} if args.tiny else {}
    extra = dict(kv.split("=", 1) for kv in args.override)
    extra = {k: int(v) if v.isdigit() else v for k, v in extra.items()}
    # The blocks run under nn.scan: one compiled block (Mamba) or one compiled group of
    # blocks (xLSTM: 7 mLSTM blocks and an sLSTM block, repeated), fast compiles.
    c.model.overrides = {"dtype": "bfloat16", "remat": args.remat, "scan_layers": args.scan_layers, **extra, **tiny}
    c.task.name = "mqar"
    c.task.params.seq_len = args.seq
    c.task.params.num_pairs = max(4, min(args.seq // 32, 64))  # 256-token vocabulary: at most 127 distinct keys
    c.task.params.vocab_size = 256
    c.task.num_train = args.batch * (steps + 2)
    c.task.num_test = args.batch
    c.task.data_dir = data_dir
    c.train.steps = steps
    c.train.batch_size = args.batch
    c.train.warmup_steps = 2
    c.eval.every_steps = 0
    c.eval.batch_size = args.batch
    c.checkpoint.every_steps = 0
    c.checkpoint.use_async = False
    c.log.every_steps = 1
    c.log.progress_bar = False
    c.log.console = True  # a step line per step: a run cut by a time limit still shows how far it got
    c.log.tensorboard = False
    c.release.write = False
    n = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.num_devices = mesh["data"], mesh["fsdp"], mesh["tensor"], n
    return c


def read_losses(workdir: str) -> tuple[dict, dict]:
    from mnemax.train.metrics import read_metrics

    losses, rates = {}, {}
    for r in read_metrics(workdir):
        if "loss" in r:
            losses[r["step"]] = r["loss"]
            rates[r["step"]] = r.get("tokens_per_s")
    return losses, rates


def run_one(model, mesh, args, data_dir, workdir, peak):
    from mnemax.train.trainer import Trainer

    steps = args.warmup + args.steps
    cfg = make_config(model, mesh, args, data_dir, steps)
    n = cfg.mesh.num_devices
    trainer = Trainer(cfg, workdir, devices=jax.devices()[:n])
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    t0 = time.time()
    result = trainer.fit().metrics
    wall = time.time() - t0
    losses, rates = read_losses(workdir)
    timed = [rates[s] for s in sorted(rates) if s > args.warmup and rates[s]]
    tps = float(np.median(timed)) if timed else float("nan")
    stats = [d.memory_stats() or {} for d in jax.devices()[:n]]
    peak_mem = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) / 1e9
    return trainer, losses, {
        "model": model, "mesh": mesh_name(mesh), "devices": n,
        "params_M": params / 1e6, "tokens_per_s": tps, "MFU": 6 * params * tps / (peak * n), "peak_GB_per_device": peak_mem,
        "final_loss": losses[max(losses)], "eval_loss": result.get("eval_loss"), "wall_s": wall,
    }


def _child(task: dict, args) -> dict:
    """One run (or one restore) in this process: ``task`` from the parent, JSON back."""
    peak, data_dir, work = task["peak"], task["data_dir"], task["work"]
    if task["kind"] == "run":
        _, losses, row = run_one(task["model"], task["mesh"], args, data_dir, task["wd"], peak)
        return {"row": row, "losses": {str(k): v for k, v in losses.items()}}
    return {"restores": restore_elsewhere(task["model"], (task["wd"], task["row"], task["mesh"]), args, data_dir, work, peak,
                                          task["target"])}


_PARENT_SET_PREALLOCATE = False


def _spawn(task: dict, argv: list[str]) -> dict:
    """Runs ``task`` in a fresh process (so each run's peak device memory is its own)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    if _PARENT_SET_PREALLOCATE:  # the parent's own setting; children allocate as usual
        env.pop("XLA_PYTHON_CLIENT_PREALLOCATE")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", json.dumps(task), "--child_out", path],
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {task['kind']} of {task['model']} on {task.get('mesh')} exited with {proc.returncode}")
    with open(path) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="xlstm-1.3b,mamba-1.4b")
    ap.add_argument("--meshes", nargs="*", default=["data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2"],
                    help="meshes to compare with one device (none: only the one-device run)")
    ap.add_argument("--baseline", default=None, help="reuse the one-device runs saved in this JSON (an earlier --out)")
    ap.add_argument("--one_device", action=argparse.BooleanOptionalAction, default=True,
                    help="run (or reuse) the one-device baseline; --no-one_device: meshes only (their efficiencies "
                         "come from a later --merge with a run that has the baseline)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine earlier --out files (e.g. the baseline and the meshes run at once on disjoint GPUs "
                         "with CUDA_VISIBLE_DEVICES) into --out, computing efficiencies and loss differences; runs nothing")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20, help="timed steps after --warmup")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True,
                    help="nn.scan over the layers (xLSTM: over its repeating groups of mLSTM and sLSTM blocks)")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="model overrides for every run, e.g. chunk_size=128 (integers or strings)")
    ap.add_argument("--restore", action=argparse.BooleanOptionalAction, default=True,
                    help="restore the first mesh's checkpoint on one device and on another mesh")
    ap.add_argument("--tiny", action="store_true", help="tiny models on 8 simulated CPU devices (a path check)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="scaling.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if args.tiny:
        args.seq, args.batch, args.steps, args.warmup = min(args.seq, 64), min(args.batch, 16), min(args.steps, 4), 1
    if args.child:
        with open(args.child_out, "w") as f:
            json.dump(_child(json.loads(args.child), args), f, default=float)
        return
    # The parent only measures the matmul rate; every run is a child process that owns
    # the devices (the parent must not preallocate their memory).
    global _PARENT_SET_PREALLOCATE
    _PARENT_SET_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    argv = sys.argv[1:]
    meshes = [parse_mesh(m) for m in args.meshes]
    most = max([m["data"] * m["fsdp"] * m["tensor"] for m in meshes] + [1])
    if most > jax.device_count():
        raise ValueError(f"--meshes: needs {most} devices, this process sees {jax.device_count()}")
    env = environment()
    print(env, flush=True)
    peak = matmul_rate(2048 if args.tiny else 8192)
    work = args.workdir or tempfile.mkdtemp(prefix="mnemax-scaling-")
    data_dir = os.path.join(work, "data")
    rows, restores, baselines = [], [], {}
    if args.baseline:
        with open(args.baseline) as f:
            baselines = json.load(f)["baselines"]
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    common = {"peak": peak, "data_dir": data_dir, "work": work}
    for model in args.models.split(","):
        base_losses, base = None, None
        try:
            if not args.one_device and model not in baselines:
                raise LookupError("--no-one_device: no one-device run here (combine with --merge)")
            got = baselines.get(model) or _spawn(
                {**common, "kind": "run", "model": model, "mesh": one, "wd": os.path.join(work, model, "one")}, argv)
            baselines[model] = got
            base_losses, base = got["losses"], dict(got["row"])
            base["efficiency"], base["loss_max_rel_diff"] = 1.0, 0.0
            rows.append(base)
        except Exception as e:  # noqa: BLE001
            rows.append({"model": model, "mesh": "1 device", "error": f"{type(e).__name__}: {str(e)[:200]}"})
        first = None
        for mesh in meshes:
            wd = os.path.join(work, model, "_".join(f"{k}{v}" for k, v in mesh.items()))
            try:
                got = _spawn({**common, "kind": "run", "model": model, "mesh": mesh, "wd": wd}, argv)
            except Exception as e:  # noqa: BLE001
                rows.append({"model": model, "mesh": mesh_name(mesh), "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            losses, row = got["losses"], got["row"]
            row["losses"] = losses  # in the JSON (not the table), for --merge
            if base is not None:
                compare(row, losses, base, base_losses)
            rows.append(row)
            first = first or (wd, row, mesh)
            save({"env": env, "matmul_flops": peak, "rows": rows, "restores": restores, "baselines": baselines}, args.out)
            print(table(rows, COLUMNS), flush=True)
        if first is not None and args.restore:
            wd, row, mesh = first
            n = most
            for target in ({"data": 1, "fsdp": 1, "tensor": 1},
                           {"data": 2, "fsdp": 2, "tensor": 2} if n >= 8 else {"data": 1, "fsdp": n, "tensor": 1}):
                if target == mesh:
                    continue
                try:
                    restores += _spawn({**common, "kind": "restore", "model": model, "mesh": mesh, "wd": wd, "row": row,
                                        "target": target}, argv)["restores"]
                except Exception as e:  # noqa: BLE001
                    restores.append({"model": model, "saved_on": row["mesh"], "restored_on": mesh_name(target),
                                     "error": f"{type(e).__name__}: {str(e)[:200]}"})
    save({"env": env, "matmul_flops": peak, "rows": rows, "restores": restores, "baselines": baselines}, args.out)
    print("\n" + table(rows, COLUMNS))
    print("\n" + table(restores, ["model", "saved_on", "restored_on", "eval_loss", "run_eval_loss", "rel_diff", "error"]))


def compare(row: dict, losses: dict, base: dict, base_losses: dict) -> None:
    """Sets ``row``'s scaling efficiency against the one-device ``base`` row and the largest
    relative difference of its loss curve from the one-device curve (steps both logged)."""
    row["efficiency"] = row["tokens_per_s"] / (row["devices"] * base["tokens_per_s"])
    row["loss_max_rel_diff"] = max(abs(losses[s] - base_losses[s]) / abs(base_losses[s]) for s in base_losses if s in losses)


def merge(files: list[str], out: str) -> None:
    """Rows, restores and baselines of several ``--out`` files in one: each mesh row's
    efficiency and loss difference are computed against its model's one-device run
    (which any of the files may hold); the first file's environment is kept."""
    docs = []
    for path in files:
        with open(path) as f:
            docs.append(json.load(f))
    baselines = {k: v for d in docs for k, v in d.get("baselines", {}).items()}
    rows, restores = [], [r for d in docs for r in d.get("restores", [])]
    for model, got in baselines.items():
        rows.append({**got["row"], "efficiency": 1.0, "loss_max_rel_diff": 0.0})
    for d in docs:
        for row in d["rows"]:
            if row.get("mesh") == "1 device":
                continue
            base = baselines.get(row.get("model"))
            if base is not None and row.get("tokens_per_s") and row.get("losses"):
                compare(row, row["losses"], base["row"], base["losses"])
            rows.append(row)
    env = dict(docs[0]["env"], merged_from=[d["env"].get("command") for d in docs])
    save({"env": env, "matmul_flops": docs[0].get("matmul_flops"), "rows": rows, "restores": restores,
          "baselines": baselines}, out)
    print(table(rows, COLUMNS))


def restore_elsewhere(model, first, args, data_dir, work, peak, target):
    """The first mesh's final checkpoint, restored on the ``target`` mesh and evaluated."""
    from mnemax.train.checkpoint import Checkpointer
    from mnemax.train.trainer import Trainer

    wd, row, mesh = first
    cfg = make_config(model, target, args, data_dir, args.warmup + args.steps)
    trainer = Trainer(cfg, os.path.join(work, model, "restore"), devices=jax.devices()[: cfg.mesh.num_devices])
    ck = Checkpointer(os.path.join(wd, "checkpoints"), use_async=False)
    _, state, _ = ck.restore_latest(trainer.abstract_state)
    ck.close()
    got = trainer.evaluate(state.params)["eval_loss"]
    return [{"model": model, "saved_on": row["mesh"], "restored_on": mesh_name(target),
             "eval_loss": got, "run_eval_loss": row["eval_loss"], "rel_diff": abs(got - row["eval_loss"]) / abs(row["eval_loss"])}]


if __name__ == "__main__":
    main()
