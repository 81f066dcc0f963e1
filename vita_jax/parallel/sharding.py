"""Logical-axis sharding: names on arrays, one rules table mapping them to mesh axes.

Parameters are created with `nnx.Param(value, logical_axes=("embed", "mlp"))`; activations are
constrained with `constrain(x, ("batch", "length", "embed"), mesh)`. The rules table below is the
one place that decides what FSDP, sequence and tensor parallelism mean (MaxText style).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "seq"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("tiles", ("data", "fsdp", "seq")),   # vision tiles/frames spread over all but tensor
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("layers", None),
    ("norm", None),
    ("conv", None),
    ("positions", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def _mesh_axes(name: str | None, rules: Rules):
  if name is None:
    return None
  for logical, physical in rules:
    if logical == name:
      return physical
  raise KeyError(f"logical axis {name!r} has no entry in the sharding rules; add it to "
                 "vita_jax.parallel.sharding.LOGICAL_RULES")


def logical_to_spec(names: Sequence[str | None], mesh: jax.sharding.Mesh | None = None,
                    shape: Sequence[int] | None = None, rules: Rules = LOGICAL_RULES
                    ) -> PartitionSpec:
  """PartitionSpec for logical `names`.

  With `mesh`, axes of size 1 are dropped and no mesh axis is used twice. With `shape` too, a
  dimension that the mesh axes do not divide is replicated instead (e.g. 2 KV heads over
  tensor=4), which keeps odd model sizes runnable on any mesh.
  """
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    physical = _mesh_axes(name, rules)
    axes = (physical,) if isinstance(physical, str) else tuple(physical or ())
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
      if shape is not None:
        size = 1
        kept = []
        for a in axes:
          if shape[i] % (size * mesh.shape[a]) == 0:
            kept.append(a)
            size *= mesh.shape[a]
        axes = tuple(kept)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def named_sharding(mesh: jax.sharding.Mesh, names: Sequence[str | None],
                   shape: Sequence[int] | None = None, rules: Rules = LOGICAL_RULES
                   ) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, mesh, shape, rules))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: jax.sharding.Mesh | None,
              rules: Rules = LOGICAL_RULES) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op without a mesh or on one device."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))


def _variable_spec(var: nnx.Variable, mesh, rules) -> PartitionSpec:
  names = var.get_metadata().get("logical_axes")
  value = var.get_value() if hasattr(var, "get_value") else var.value
  if names is None:
    return PartitionSpec()
  if len(names) != value.ndim:
    raise ValueError(f"logical_axes {names} do not match a parameter of shape {value.shape}")
  return logical_to_spec(names, mesh, value.shape, rules)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_RULES):
  """A pytree of NamedShardings matching `state` (variables without names are replicated)."""
  return jax.tree.map(lambda v: NamedSharding(mesh, _variable_spec(v, mesh, rules)), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules = LOGICAL_RULES):
  """Place every variable of `state` on `mesh` according to its logical axes."""
  shardings = state_shardings(state, mesh, rules)
  return jax.device_put(state, shardings)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """[batch, length, ...] arrays: batch over data/fsdp, length over seq."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length") + (None,) * (ndim - 2), mesh))
