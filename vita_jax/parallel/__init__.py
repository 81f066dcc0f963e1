"""Mesh creation, logical-axis sharding rules and the zigzag sequence layout."""

from vita_jax.parallel.mesh import MESH_AXES, ConfigError, make_mesh, resolve_mesh_shape
from vita_jax.parallel.sharding import (
                                        LOGICAL_RULES,
                                        constrain,
                                        logical_to_spec,
                                        named_sharding,
                                        shard_state,
                                        state_shardings,
)

__all__ = ["MESH_AXES", "ConfigError", "make_mesh", "resolve_mesh_shape", "LOGICAL_RULES",
           "constrain", "logical_to_spec", "named_sharding", "shard_state", "state_shardings"]
