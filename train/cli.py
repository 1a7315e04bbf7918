"""``python -m mnemax.train`` / ``mnemax-train``: train a zoo model on a memory task.

    mnemax-train --config=mqar:transformer --workdir=runs/mqar \\
        [--config.train.steps=500 --config.mesh.fsdp=2 --config.model.overrides.mlp_ratio=2.0 ...]

``--config`` names a config shipped in the package (``mqar``, ``passkey``, ... : the
modules of :mod:`mnemax.configs`, so it works from any directory) or a config file
(``path/to/config.py:arg``). Every field can be overridden; ``model.overrides`` lists
every field of the chosen model (its ``ModelConfig`` fields and all its family's block
options), and an unknown field is an error listing the valid ones.

Exit codes: 0 done; 2 a bad config (or a checkpoint trained under another config:
``--config.checkpoint.allow_changes``); 1 stopped (more non-finite steps than
``train.max_nonfinite_steps``, or no good checkpoint: ``--config.checkpoint.restart_if_corrupt``).

Multi-host: pass ``--coordinator_address=host:port --num_processes=N --process_id=i``
(or run under a cluster environment that ``jax.distributed.initialize()`` detects,
or set ``--distributed``). On CPUs the processes talk over gloo.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config: a packaged one (mqar:transformer) or a file (path/config.py:arg).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the release bundle.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's auto-detection.")


def init_distributed() -> None:
    import jax

    explicit = FLAGS.coordinator_address is not None or FLAGS.num_processes is not None
    cluster_env = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"))
    if not (explicit or FLAGS.distributed or (cluster_env and os.environ.get("MNEMAX_NO_DISTRIBUTED") != "1")):
        return
    if explicit and None in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
        raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    init_distributed()
    from .checkpoint import CheckpointCorruptError
    from .trainer import Trainer, TrainingDivergedError

    try:
        result = Trainer(FLAGS.config, FLAGS.workdir).fit().metrics
    except ValueError as err:  # the config, or a checkpoint that does not fit it
        print(f"mnemax-train: bad config: {err}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDivergedError, CheckpointCorruptError) as err:
        print(f"mnemax-train: stopped: {err}", file=sys.stderr)
        sys.exit(1)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.items()) if isinstance(v, float))
    print(f"done: {summary}", flush=True)


def packaged_config_path(value: str) -> str:
    """``--config`` value -> a config file path: ``name[:arg]`` of a module of
    :mod:`mnemax.configs` becomes its file; an existing file (or any ``.py`` path) is kept."""
    name, sep, arg = value.partition(":")
    if name.endswith(".py") or os.sep in name or os.path.exists(name):
        return value
    import mnemax.configs

    folder = os.path.dirname(os.path.abspath(mnemax.configs.__file__))
    available = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f not in ("__init__.py", "base.py"))
    if name not in available:
        print(f"mnemax-train: --config: {name!r} is neither a config file nor a packaged config; packaged: {available}",
              file=sys.stderr)
        sys.exit(2)
    return os.path.join(folder, name + ".py") + sep + arg


def _rewrite_config_flag(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("--config="):
            a = "--config=" + packaged_config_path(a[len("--config="):])
        out.append(a)
    return out


def _load_config(value: str):
    """The ConfigDict of a ``--config=path.py[:arg]`` value (as config_flags loads it)."""
    import importlib.util

    path, sep, arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("mnemax_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _unknown_override(argv: list[str]) -> str | None:
    """The message for the first ``--config.<path>=...`` naming no field of the loaded config."""
    value = [a[len("--config="):] for a in argv if a.startswith("--config=")]
    if not value:
        return None
    config = _load_config(value[-1])
    for a in argv:
        if not a.startswith("--config."):
            continue
        path = a[len("--config."):].split("=", 1)[0].split(".")
        node, walked = config, []
        for key in path:
            if not hasattr(node, "keys") or key not in node.keys():
                where = "--config" + "".join(f".{k}" for k in walked)
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return f"{a.split('=', 1)[0]}: no such field; {where} has {valid}"
            node, walked = node[key], walked + [key]
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    argv = _rewrite_config_flag(argv)
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as err:  # ml_collections: an override of a field that does not exist
        try:
            message = _unknown_override(argv[1:])
        except Exception:  # noqa: BLE001 - report the original error then
            message = None
        print(f"mnemax-train: {message or err}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """Console-script entry point."""
    logging.set_verbosity(logging.ERROR)
    app.run(main, flags_parser=_parse_flags)
