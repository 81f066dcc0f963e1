"""The model state as plain pytrees for the jitted step, and the shardings of the train state.

The NNX module is split into a static graph and two states once, outside the hot loop
(docs/design.md#library-notes): trainable params and frozen variables become nested dicts of
arrays, which optax and orbax handle natively, and `merge` rebuilds the module inside the step.
The train state is `{"params", "opt_state", "step"}`; `state_shardings` places all of it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vita_jax.parallel.sharding import named_sharding


def _is_var(x):
  return isinstance(x, nnx.Variable)


class Split(NamedTuple):
  """How to rebuild the module: graph + the two states' tree structures + their metadata."""
  graphdef: Any
  trainable_def: Any   # treedef of the trainable nnx.State
  frozen_def: Any
  trainable_axes: Any  # nested dict of logical-axis tuples, like the pure trainable params
  frozen_axes: Any


def trainable_filter(trainable: tuple[str, ...]):
  return nnx.All(nnx.Param, lambda path, _: bool(path) and path[0] in trainable)


def split_model(model: nnx.Module, trainable: tuple[str, ...]):
  """-> (Split, trainable params, frozen state) with params as nested dicts of arrays."""
  graphdef, train_state, frozen_state = nnx.split(model, trainable_filter(trainable), ...)
  axes = lambda st: to_pure(st, lambda v: v.get_metadata().get("logical_axes"))
  split = Split(graphdef, jax.tree.structure(train_state), jax.tree.structure(frozen_state),
                axes(train_state), axes(frozen_state))
  return split, to_pure(train_state), to_pure(frozen_state)


def to_pure(state: nnx.State, fn=None):
  """nnx.State -> nested dict keyed like the state, holding `fn(variable)` (default: value)."""
  fn = fn or (lambda v: v.get_value())
  out: dict = {}
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_var):
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    node = out
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = fn(var)
  return out


def merge(split: Split, trainable, frozen) -> nnx.Module:
  """Rebuild the module from pure trees (inside jit: the leaves are tracers)."""
  t = jax.tree.unflatten(split.trainable_def, jax.tree.leaves(trainable))
  f = jax.tree.unflatten(split.frozen_def, jax.tree.leaves(frozen))
  return nnx.merge(split.graphdef, t, f)


def shardings_like(pure_tree, axes_tree, mesh):
  """NamedShardings for a pure param tree from its logical-axes tree."""
  is_axes = lambda x: x is None or isinstance(x, tuple)
  return jax.tree.map(
      lambda axes, x: named_sharding(mesh, axes or (None,) * x.ndim, x.shape),
      axes_tree, pure_tree, is_leaf=is_axes)


def initial_state(tx: optax.GradientTransformation, params) -> dict:
  """The train state at step 0; under `jax.eval_shape` its shapes, allocating nothing."""
  return dict(params=params, opt_state=tx.init(params), step=jnp.int32(0))


def state_shardings(tx: optax.GradientTransformation, split: Split, params, frozen, mesh):
  """(shardings of the train state {params, opt_state, step}, shardings of `frozen`).

  `params` and `frozen` may be arrays or `jax.ShapeDtypeStruct`s: only shapes are read. Adam
  moments take their parameter's sharding; counters and the step are replicated.
  """
  param_sh = shardings_like(params, split.trainable_axes, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params),
                                 param_sh, transform_non_params=lambda _: replicated)
  state_sh = dict(params=param_sh, opt_state=opt_sh, step=replicated)
  return state_sh, shardings_like(frozen, split.frozen_axes, mesh)


def abstract_like(tree, shardings):
  """`jax.ShapeDtypeStruct`s with the shapes and dtypes of `tree` (arrays or abstract) placed
  by `shardings`: the target of an orbax restore or the input of an ahead-of-time compile."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
