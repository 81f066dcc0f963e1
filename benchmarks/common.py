"""What every figure shares: timing with repeats + median, result rows, machine facts, peaks.

A `Row` is one compared measurement: our value, the baseline's value measured in the same run,
their ratio (oriented so that > 1 means we are better), and the target the issue sets for it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Context:
  """What a figure may read: the mode and where to put scratch files."""
  quick: bool
  repeats: int
  scratch: str
  smoke: bool = False            # trivially small shapes: only checks that the code runs
  log: Callable[[str], None] = print


@dataclasses.dataclass
class Row:
  figure: str                    # e.g. "1 train"
  metric: str                    # what is measured, with its unit
  ours: float | None
  baseline: float | None = None
  baseline_name: str = ""
  ratio: float | None = None     # > 1 = ours better (orientation depends on the metric)
  target: str = ""               # human-readable, e.g. ">= 1.2x"
  passed: bool | None = None     # None = no target, or not measurable here
  repeats: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  note: str = ""

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def median(xs) -> float:
  return float(statistics.median(xs))


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """Wall seconds of `fn()` over `repeats` runs after `warmup` untimed ones. `fn` must block
  until its work is done (call `jax.block_until_ready` inside)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def check(value: float | None, op: str, bound: float) -> bool | None:
  if value is None:
    return None
  return bool(value >= bound) if op == ">=" else bool(value <= bound)


def jax_matmul_peak(size: int = 2048, repeats: int = 5) -> list[float]:
  """FLOP/s of an fp32 size x size matmul in JAX on the default device, one per repeat."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  times = time_call(lambda: mm(a).block_until_ready(), repeats, warmup=2)
  return [2 * size ** 3 / t for t in times]


def torch_matmul_peak(size: int = 2048, repeats: int = 5) -> list[float]:
  import torch
  a = torch.randn(size, size)
  times = time_call(lambda: a @ a, repeats, warmup=2)
  return [2 * size ** 3 / t for t in times]


def machine_info() -> dict[str, Any]:
  import importlib.metadata as md
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy",
              "ringattention"):
    try:
      versions[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      versions[pkg] = None
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  mem_gb = None
  try:
    with open("/proc/meminfo") as f:
      mem_gb = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
  except (OSError, StopIteration):
    pass
  return dict(cpu=cpu, cpu_count=os.cpu_count(), memory_gb=mem_gb,
              python=platform.python_version(), platform=platform.platform(),
              versions=versions)


def available_memory_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable"):
        return int(line.split()[1]) * 1024
  raise OSError("MemAvailable not found in /proc/meminfo")


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]
