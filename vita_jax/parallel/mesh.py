"""Device mesh from config: axes (data, fsdp, seq, tensor), -1 fills the rest.

The mesh uses *Auto* axis types (docs/design.md#library-notes): our functions shard with explicit
`NamedSharding`s and `shard_map`, and must not depend on Explicit-mode type checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from vita_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "seq", "tensor")


_FAKE_HINT = (" (on a CPU, fake devices come from "
              "XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Axis sizes with the single -1 (if any) filled so the product equals `num_devices`."""
  unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"unknown mesh axis {unknown[0]!r} in config.mesh; the axes are "
                      f"{', '.join(MESH_AXES)}")
  shape = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in shape.items() if size == -1]
  bad = [axis for axis, size in shape.items() if size == 0 or size < -1]
  if bad:
    raise ConfigError(f"config.mesh.{bad[0]}={shape[bad[0]]} is not a valid axis size; use a "
                      "positive integer, or -1 to fill the remaining devices")
  if len(fill) > 1:
    raise ConfigError(f"config.mesh has -1 on {' and '.join(fill)}; at most one axis may be -1 "
                      "(set the others explicitly)")
  fixed = math.prod(size for size in shape.values() if size != -1)
  if fill:
    if num_devices % fixed:
      desc = ", ".join(f"{a}={s}" for a, s in shape.items() if s not in (1, -1))
      raise ConfigError(
          f"mesh {desc} needs a multiple of {fixed} devices but {num_devices} are available "
          f"(config.mesh.{fill[0]}=-1 fills the rest); choose sizes whose product divides "
          f"{num_devices}{_FAKE_HINT}")
    shape[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    desc = ", ".join(f"{a}={s}" for a, s in shape.items())
    raise ConfigError(
        f"mesh {desc} has {fixed} devices but {num_devices} are available; make the product "
        f"{num_devices} or set one axis to -1 (e.g. --config.mesh.data=-1){_FAKE_HINT}")
  return shape


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A `Mesh` over `devices` (default: all) with axes MESH_AXES and Auto axis types.

  Devices are laid out by `mesh_utils` so that the innermost axes (seq, tensor) map to
  neighbouring devices, whose links are the fastest on TPU/GPU slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  dims = tuple(shape[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
  except Exception:  # CPU / odd topologies: a plain row-major layout is as good as any
    grid = np.asarray(devices, dtype=object).reshape(dims)
  return jax.sharding.Mesh(grid, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
