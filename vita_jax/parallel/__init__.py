"""Mesh creation and the logical-axis sharding rules (the zigzag layout is vita_jax.spec.zigzag)."""

from vita_jax.parallel.mesh import MESH_AXES, make_mesh, resolve_mesh_shape
from vita_jax.parallel.sharding import (
                                        LOGICAL_RULES,
                                        constrain,
                                        logical_to_spec,
                                        named_sharding,
                                        shard_state,
                                        state_shardings,
)

__all__ = ["MESH_AXES", "make_mesh", "resolve_mesh_shape", "LOGICAL_RULES",
           "constrain", "logical_to_spec", "named_sharding", "shard_state", "state_shardings"]
