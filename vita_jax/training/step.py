"""Model state as plain pytrees for the jitted step: trainable/frozen split, logical axes,
shardings, and the jitted train step itself.

The NNX module is split into a static graph and two states once, outside the hot loop
(docs/design.md#library-notes); the step is a pure function of nested dicts of arrays, which optax
and orbax
handle natively.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from vita_jax.ops.lm_head import chunked_cross_entropy
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


def _loss_sum_fn(split: Split, config: ml_collections.ConfigDict):
  """(params, frozen, micro-batch) -> (loss_sum, supervised-token count) of one micro-batch."""
  chunk = int(config.train.lm_head_chunk)
  z_loss = float(config.train.z_loss)
  fused = bool(config.train.get("lm_head_fused_grad", True))

  def loss_sum_fn(params, frozen, micro):
    model = merge(split, params, frozen)
    hidden = model(micro["input_ids"], pixel_values=micro.get("pixel_values"),
                   positions=micro["positions"], segment_ids=micro["segment_ids"],
                   context_index=micro.get("context_index"), return_hidden=True)
    loss_sum, count = chunked_cross_entropy(hidden, model.lm_head_weight(), micro["labels"],
                                            chunk_size=chunk, z_loss=z_loss, mesh=model.mesh,
                                            fused_grad=fused)
    return loss_sum, count

  return loss_sum_fn


def make_eval_step(split: Split, config: ml_collections.ConfigDict):
  """eval(params, frozen, batches) -> (loss_sum, count) summed over stacked micro-batches."""
  loss_sum_fn = _loss_sum_fn(split, config)

  def evaluate(params, frozen, batches):
    def body(carry, micro):
      loss_sum, count = loss_sum_fn(params, frozen, micro)
      return (carry[0] + loss_sum, carry[1] + count.astype(jnp.float32)), None
    (loss_sum, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), batches)
    return loss_sum, count

  return evaluate


def make_train_step(split: Split, tx: optax.GradientTransformation, schedule,
                    config: ml_collections.ConfigDict):
  """step(state, frozen, batches) -> (state, metrics); `batches` stacks grad_accum
  micro-batches on a leading axis. The loss is the supervised-token mean over the whole
  global batch: sums and counts are accumulated separately and divided once."""
  grad_fn = jax.value_and_grad(_loss_sum_fn(split, config), has_aux=True)

  def step(state, frozen, batches):
    params = state["params"]

    def accumulate(carry, micro):
      grads, loss_sum, count = carry
      (l, c), g = grad_fn(params, frozen, micro)
      grads = jax.tree.map(jnp.add, grads, g)
      return (grads, loss_sum + l, count + c.astype(jnp.float32)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss_sum, count), _ = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0)), batches)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    # A NaN loss with finite gradients is still a bad step: poison the update so it is skipped.
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1)
    metrics = dict(loss=loss, supervised_tokens=count, grad_norm=optax.global_norm(grads),
                   lr=schedule(state["step"]),
                   nonfinite_consecutive=opt_state.notfinite_count,
                   nonfinite_total=opt_state.total_notfinite)
    return new_state, metrics

  return step
