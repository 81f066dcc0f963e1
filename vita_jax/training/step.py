"""The loss, the train step and the eval step: pure functions of the pure state trees of
`training.state` (trainable params, frozen variables) and a batch of stacked micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vita_jax.ops.lm_head import chunked_cross_entropy
from vita_jax.training.state import Split, merge


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
