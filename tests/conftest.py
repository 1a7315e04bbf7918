"""Test session setup: 8 simulated CPU devices (for the sharding tests), set before
jax is imported anywhere in the process.

On the CPU the suite is bound by XLA compile time (tiny shapes, hundreds of distinct
programs), so the CPU backend compiles with LLVM at -O1 instead of its default -O2:
about 19% less time for tests/test_xlstm_layers.py + test_hopfield.py on 2 cores (251 ->
203 s). Results differ from -O2 by rounding only (6e-8 at most on the mLSTM and Mamba
layers' outputs and gradients). -O0 is not used: it changes results by ~3e-6, enough for
the 7B-layout mLSTM layers' lr 1e-2 training check to diverge. A level already in
XLA_FLAGS, or a run on another platform (JAX_PLATFORMS=cuda), is left alone."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = flags
