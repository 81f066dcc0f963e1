"""The optimizer recipe: warmup + cosine schedule and the stage-2 ViT LR multipliers."""

import jax
import numpy as np
import pytest

from configs import stage2
from vita_jax.train import build_model
from vita_jax.training import optim
from vita_jax.training.state import split_model


def test_schedule_warms_up_then_decays_to_min():
  train = stage2.get_config("tiny").train
  train.update(steps=100, peak_lr=1e-3, min_lr=1e-5, warmup_fraction=0.1)
  lr = optim.learning_rate_schedule(train)
  values = np.array([float(lr(i)) for i in range(100)])
  np.testing.assert_allclose(values[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-6)
  assert values[0] > 0                           # the first step already learns
  assert np.all(np.diff(values[9:]) <= 1e-12)     # then only decays
  assert values[-1] == pytest.approx(1e-5, rel=1e-5)
  mid = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * 45 / 90))
  assert values[54] == pytest.approx(mid, rel=1e-5)


def test_vit_lr_multiplier_and_layer_decay_follow_depth():
  config = stage2.get_config("tiny")
  split, params, _ = split_model(build_model(config, None), ("vision", "projector", "llm"))
  mult = optim.lr_multipliers(params, split.trainable_axes, config.train)
  depth = config.model.vision.num_layers
  layer = np.asarray(mult["vision"]["layers"]["qkv_kernel"]).reshape(-1)
  # Layer i (1-based) gets 0.1 * 0.9 ** (depth - i): the last layer 0.1, earlier ones less.
  np.testing.assert_allclose(layer, 0.1 * 0.9 ** (depth - np.arange(1, depth + 1)), rtol=1e-6)
  np.testing.assert_allclose(mult["vision"]["patch_kernel"], 0.1 * 0.9 ** depth, rtol=1e-6)
  assert all(float(m) == 1.0 for m in jax.tree.leaves(mult["llm"]) + jax.tree.leaves(
      mult["projector"]))
