"""8 fake CPU devices for every test, so every mesh shape up to 8 devices runs on CPU.

XLA_FLAGS must be set before jax is imported anywhere in the process.
"""

import os
import sys

_flags = os.environ.get("XLA_FLAGS", "")
# The tests' programs are tiny and each is compiled once, so compiling is most of their CPU time:
# LLVM's optimisation level 0 compiles a third faster. XLA's passes, and so the programs and
# their numerics contract, are unchanged; `make train`, the benchmarks and users run the default.
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Threads for 8 fake devices; vita_jax/__init__.py explains why (it sets the same when imported).
os.environ.setdefault("PJRT_NPROC", "64")
# Keep intra-op threads modest: pytest-xdist runs two workers on two cores.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.abspath(__file__))

# One persistent XLA compilation cache for the run, shared by both pytest-xdist workers and the
# single-process CLIs the tests start: many tests compile the same programs (the same train step,
# the same eager slices of every checkpoint save), and a hit loads the executable instead. The key
# covers the program, the devices, the compile options and XLA_FLAGS, so a hit is the same
# executable. A size limit turns on the cache's file lock (no half-written reads). Multi-process
# launches go without it (tests/multiprocess.py says why).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
  """Slow tests first (a stable sort): with two xdist workers, the longest tests start early and
  the quick ones fill in around them, so neither worker is left running a long test alone."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
