"""8 fake CPU devices for every test, so every mesh shape up to 8 devices runs on CPU.

XLA_FLAGS must be set before jax is imported anywhere in the process.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Threads for 8 fake devices; vita_jax/__init__.py explains why (it sets the same when imported).
os.environ.setdefault("PJRT_NPROC", "64")
# Keep intra-op threads modest: pytest-xdist runs two workers on two cores.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
