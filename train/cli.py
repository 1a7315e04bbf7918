"""``python -m mnemax.train`` / ``mnemax-train``: train a zoo model on a memory task.

    mnemax-train --config=configs/mqar.py:transformer --workdir=runs/mqar \\
        [--config.train.steps=500 --config.mesh.fsdp=2 ...]

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
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/mqar.py:transformer.", lock_config=True)
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
        result = Trainer(FLAGS.config, FLAGS.workdir).run()
    except ValueError as err:  # the config, or a checkpoint that does not fit it
        print(f"mnemax-train: bad config: {err}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDivergedError, CheckpointCorruptError) as err:
        print(f"mnemax-train: stopped: {err}", file=sys.stderr)
        sys.exit(1)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.items()) if isinstance(v, float))
    print(f"done: {summary}", flush=True)


def run() -> None:
    """Console-script entry point."""
    logging.set_verbosity(logging.ERROR)
    app.run(main)
