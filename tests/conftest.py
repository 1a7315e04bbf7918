"""Test session setup: 8 simulated CPU devices (for the sharding tests), set before
jax is imported anywhere in the process.

On the CPU the suite is bound by XLA compile time (tiny shapes, hundreds of distinct
programs), so the CPU backend compiles with LLVM at -O1 instead of its default -O2:
about 19% less time for tests/test_xlstm_layers.py + test_hopfield.py on 2 cores (251 ->
203 s). Results differ from -O2 by rounding only (6e-8 at most on the mLSTM and Mamba
layers' outputs and gradients). -O0 is not used: it changes results by ~3e-6, enough for
the 7B-layout mLSTM layers' lr 1e-2 training check to diverge. A level already in
XLA_FLAGS, or a run on another platform (JAX_PLATFORMS=cuda), is left alone.

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
    flags += " --xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = flags

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mnemax-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    # every program, however small or quick to compile (the default keeps only >1 s compiles)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
