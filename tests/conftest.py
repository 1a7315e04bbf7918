"""Test session setup: 8 simulated CPU devices (for the sharding tests), set before
jax is imported anywhere in the process.

On the CPU the suite is bound by XLA compile time (tiny shapes, hundreds of distinct
programs), so the CPU backend compiles with LLVM at -O0 instead of its default -O2: the
layer contracts take 197 s at -O0 against 310 s at -O1 (-n 2, the 25 in CI), and -O1 had
already saved 19% against -O2. Results differ by rounding only. -O0 once turned the xLSTM 7B
block's training check to NaN: not divergence but jnp.max's gradient dividing by a count of
entries equal to the max that a recomputed operand made 0 (fixed in the mLSTM forms by
``kernels.mlstm.common.stabiliser_max``), so a different compile exposing a 0/0 is a bug
found, not a reason to avoid it. A level already in XLA_FLAGS, or a run on another platform
(JAX_PLATFORMS=cuda), is left alone.

Many tests compile the same programs (the benchmark's smoke cell, the flag tests that
train it again at other rates and seeds, the notebooks, the subprocesses of the
entry-point and multi-process tests), so the session shares one persistent compilation
cache: a fresh temporary directory made by the process that first imports this file (the
xdist controller, whose workers and their subprocesses inherit it through the
environment) and removed when that process exits. A cache is never reused across runs,
so a code change can't be answered from a stale entry; an unreadable entry (a worker
reading one while another writes it) is a warning and a recompile in JAX, not an error.
A cache directory already set in the environment is used as given and kept."""

import atexit
import os
import shutil
import tempfile

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mnemax-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # every program, however small or quick to compile (the default keeps only >1 s compiles)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
