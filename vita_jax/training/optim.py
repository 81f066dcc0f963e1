"""The optimizer of docs/design.md#stages: Adam(0.9, 0.999), no decay, clip 1.0, warmup + cosine,
with per-parameter LR multipliers (stage 2: ViT x0.1 and layer-wise decay 0.9).

Only trainable parameters reach the optimizer: frozen ones get neither optimizer state nor
gradients (the trainer differentiates with respect to the trainable split alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak over `warmup_fraction` of the steps (the first step already
  uses peak/warmup, not 0), then cosine from peak to min LR at the last step."""
  if train.schedule != "cosine":
    raise ValueError(f"train.schedule={train.schedule!r} is not supported; use 'cosine'")
  warmup = max(1, int(round(train.warmup_fraction * train.steps)))
  decay = max(1, train.steps - warmup)
  peak, low = float(train.peak_lr), float(train.min_lr)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = peak * (count + 1) / warmup
    progress = jnp.clip((count + 1 - warmup) / decay, 0.0, 1.0)
    cosine = low + (peak - low) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(count + 1 < warmup, warm, cosine)

  return schedule


def lr_multipliers(params, logical_axes, train: ml_collections.ConfigDict):
  """A tree of LR multipliers matching `params` (nested dict of arrays, top-level keys
  `vision` / `projector` / `llm`); `logical_axes` is the matching tree of axis-name tuples.

  1 for the LLM and projector. For the vision tower `vision_lr_mult * layer_decay ** (depth -
  layer)`: stacked (scanned) layers get a per-layer vector along their leading `layers` axis,
  and parameters outside the layers (patch and position embeddings) count as layer 0.
  """
  decay, mult = float(train.layer_decay), float(train.vision_lr_mult)
  vision_axes = jax.tree.leaves(logical_axes.get("vision", {}), is_leaf=_is_axes)
  vision_params = jax.tree.leaves(params.get("vision", {}))
  depth = max([p.shape[0] for p, a in zip(vision_params, vision_axes)
               if a and a[0] == "layers"], default=0)

  def one(path, value, axes):
    if _key_name(path[0]) != "vision":
      return np.ones((), np.float32)
    if axes and axes[0] == "layers":
      scales = mult * decay ** (depth - np.arange(1, depth + 1))
      return scales.astype(np.float32).reshape((depth,) + (1,) * (value.ndim - 1))
    return np.asarray(mult * decay ** depth, np.float32)

  axes_leaves = jax.tree.leaves(logical_axes, is_leaf=_is_axes)
  paths_values = jax.tree_util.tree_leaves_with_path(params)
  flat = [one(path, value, axes) for (path, value), axes in zip(paths_values, axes_leaves)]
  return jax.tree.unflatten(jax.tree.structure(params), flat)


def _is_axes(x):
  return x is None or (isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))


def _key_name(key):
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiply each update by its entry of `multipliers` (a scalar or a broadcastable array)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(params, logical_axes, train: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam chain over the trainable `params` (nested dict of arrays), skipping non-finite steps.

  `optax.apply_if_finite` leaves params and moments untouched on a NaN/Inf gradient and counts
  it; the trainer stops after `max_consecutive_nonfinite` of them in a row. Its own give-up
  limit is set out of reach: a non-finite update is never applied.
  """
  schedule = learning_rate_schedule(train)
  chain = [optax.clip_by_global_norm(train.grad_clip),
           optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps)]
  if train.weight_decay:
    chain.append(optax.add_decayed_weights(train.weight_decay))
  if train.vision_lr_mult != 1.0 or train.layer_decay != 1.0:
    chain.append(scale_by_tree(lr_multipliers(params, logical_axes, train)))
  chain.append(optax.scale_by_learning_rate(schedule))
  tx = optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=2**30)
  return tx, schedule
