"""Mesh construction and the logical-axis sharding rules, on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vita_jax.parallel import make_mesh, resolve_mesh_shape
from vita_jax.parallel.sharding import (
  batch_sharding,
  constrain,
  logical_to_spec,
  shard_state,
  state_shardings,
)


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("cfg, shape", [
    ({"data": -1}, (8, 1, 1, 1)),
    ({"data": 2, "seq": 4}, (2, 1, 4, 1)),
    ({"data": 1, "seq": -1}, (1, 1, 8, 1)),
    ({"data": -1, "fsdp": 2, "tensor": 2}, (2, 2, 1, 2)),
])
def test_mesh_shapes(cfg, shape):
  mesh = make_mesh(cfg)
  assert tuple(mesh.shape.values()) == shape
  assert mesh.axis_names == ("data", "fsdp", "seq", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert resolve_mesh_shape(cfg, 8) == dict(zip(mesh.axis_names, shape))


def test_rules_map_logical_names_to_mesh_axes():
  mesh = make_mesh({"data": 2, "fsdp": 2, "seq": 1, "tensor": 2})
  assert logical_to_spec(("embed", "mlp"), mesh) == P("fsdp", "tensor")
  assert logical_to_spec(("batch", "length", "act_embed"), mesh) == P(("data", "fsdp"), None,
                                                                      None)
  assert logical_to_spec(("vocab", "embed"), mesh) == P("tensor", "fsdp")
  # A dimension the axis does not divide is replicated rather than failing.
  assert logical_to_spec(("embed", "kv_heads"), mesh, shape=(64, 3)) == P("fsdp", None)
  with pytest.raises(KeyError, match="no entry in the sharding rules"):
    logical_to_spec(("not_an_axis",), mesh)


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 32)), logical_axes=("embed", "mlp"))
    self.b = nnx.Param(jnp.zeros((32,)), logical_axes=("mlp",))
    self.s = nnx.Param(jnp.ones((4,)))  # no names: replicated


def test_shard_state_places_params_by_logical_axes():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state = nnx.state(_Tiny(nnx.Rngs(0)))
  sharded = shard_state(state, mesh)
  shardings = state_shardings(state, mesh)
  assert shardings["w"].spec == P("fsdp", "tensor")
  w = sharded["w"].get_value()
  assert w.sharding.spec == P("fsdp", "tensor")
  assert w.addressable_shards[0].data.shape == (8, 16)
  np.testing.assert_array_equal(np.asarray(w), np.asarray(state["w"].get_value()))
  assert sharded["s"].get_value().sharding.spec == P()


def test_constrain_and_batch_sharding_inside_jit():
  mesh = make_mesh({"data": 2, "seq": 4})
  x = jnp.arange(2 * 16 * 4, dtype=jnp.float32).reshape(2, 16, 4)
  y = jax.jit(lambda a: constrain(a * 2, ("batch", "length", "act_embed"), mesh))(x)
  assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data", "seq")), 3)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
  assert batch_sharding(mesh, 2).spec == P("data", "seq")
