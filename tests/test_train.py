"""The trainer: mesh equivalence, frozen stages, grad accumulation, NaN skipping, clear errors.

Kill-and-resume lives in test_train_resume.py (it runs the CLI as subprocesses).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import stage1, stage2, stage3, stage4
from vita_jax.checkpoints.workdir import assign_params
from vita_jax.parallel.mesh import make_mesh
from vita_jax.train import build_model, train
from vita_jax.training import optim
from vita_jax.training import step as train_step
from vita_jax.training.metrics import read_metrics
from vita_jax.training.state import split_model


def _small(config, steps=2, seq_len=256, batch=2):
  config.train.steps = steps
  config.train.eval_every = 0
  config.train.log_every = 1
  config.train.checkpoint_every = 1000
  config.train.peak_tflops_per_device = 1.0   # skip the peak measurement
  config.data.seq_len = seq_len
  config.data.global_batch_size = batch
  config.data.tiles_per_batch = 16
  return config


def _losses(workdir, key="loss"):
  return [m[key] for m in read_metrics(str(workdir)) if key in m]


@pytest.mark.parametrize("stage", [stage1, stage2, stage3, stage4],
                         ids=["stage1", "stage2", "stage3", "stage4"])
def test_loss_on_data2_seq4_mesh_equals_single_device(stage, tmp_path):
  """Train and held-out losses on (data=2, seq=4) — zigzag layout, ring attention, tiles
  split over data — equal the single-device run."""
  runs = {}
  for name, mesh, devices in (("one", {"data": 1}, jax.devices()[:1]),
                              ("eight", {"data": 2, "seq": 4}, None)):
    config = _small(stage.get_config("tiny"))
    config.mesh.update(mesh)
    config.train.eval_every, config.train.eval_batches = 2, 1
    train(config, str(tmp_path / name), devices=devices)
    runs[name] = _losses(tmp_path / name), _losses(tmp_path / name, "eval_loss")
  (one, one_eval), (eight, eight_eval) = runs["one"], runs["eight"]
  assert len(one) == len(eight) == 2 and len(one_eval) == len(eight_eval) == 1
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  np.testing.assert_allclose(eight_eval, one_eval, rtol=1e-5)
  assert one[1] != one[0]  # the step changed the params


def _synthetic_batches(accum, rows, seq, vocab, seed=0, tiles=2, context_id=5, tpt=4, px=56):
  """Random tokens with `tiles` images' context tokens at the start of each micro-batch."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(20, vocab, (accum, rows, seq)).astype(np.int32)
  ids[:, 0, 1:1 + tiles * tpt] = context_id
  labels = np.roll(ids, -1, axis=2)
  labels[..., : seq // 4] = -100         # a prompt without loss
  labels[..., -1] = -100
  segs = np.ones_like(ids)
  segs[..., -seq // 8:] = 0              # padding tail
  pos = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()
  pixels = rng.normal(size=(accum, tiles, px, px, 3)).astype(np.float32)
  return dict(input_ids=ids, labels=np.where(segs > 0, labels, -100), positions=pos,
              segment_ids=segs, pixel_values=pixels)


def _one_step(config, batches, sgd=False):
  """One train step; with `sgd` the update is exactly -gradient (lr 1), to compare gradients."""
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  model = build_model(config, mesh)
  split, params, frozen = split_model(model, tuple(config.train.trainable))
  tx, schedule = optim.make_optimizer(params, split.trainable_axes, config.train)
  if sgd:
    tx = optax.apply_if_finite(optax.sgd(1.0), 5)
  state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(3))
  step = jax.jit(train_step.make_train_step(split, tx, schedule, config))
  return params, frozen, *step(state, frozen, batches)


def test_grad_accumulation_4x1_equals_batch_4():
  config = _small(stage2.get_config("tiny"))
  config.train.grad_accum = 4
  micro = _synthetic_batches(4, 1, 64, config.model.llm.vocab_size)
  params, _, acc_state, acc_metrics = _one_step(config, micro, sgd=True)
  config.train.grad_accum = 1
  whole = {k: v.reshape(1, 4, *v.shape[2:]) for k, v in micro.items() if k != "pixel_values"}
  whole["pixel_values"] = micro["pixel_values"].reshape(1, -1, *micro["pixel_values"].shape[2:])
  _, _, full_state, full_metrics = _one_step(config, whole, sgd=True)
  np.testing.assert_allclose(acc_metrics["loss"], full_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(acc_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
  assert float(full_metrics["grad_norm"]) > 0
  for p0, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(acc_state["params"]),
                      jax.tree.leaves(full_state["params"])):
    grad_acc, grad_full = np.asarray(p0) - a, np.asarray(p0) - b
    # fp32 resolution of the recovered gradient is ~1e-7 x |param|.
    tol = 1e-5 * np.abs(grad_full).max() + 4e-7 * max(1.0, np.abs(np.asarray(p0)).max())
    np.testing.assert_allclose(grad_acc, grad_full, atol=tol)


def test_stage1_trains_only_the_projector(tmp_path):
  config = _small(stage1.get_config("tiny"))
  config.mesh.update(data=1)
  batches = _synthetic_batches(1, 2, 64, config.model.llm.vocab_size)
  params, frozen, state, metrics = _one_step(config, batches)
  assert set(params) == {"projector"}                      # only it has optimizer state
  assert set(frozen) >= {"vision", "llm"}
  assert np.isfinite(metrics["loss"])
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(params), jax.tree.leaves(state["params"]))]
  assert any(moved)


def test_nonfinite_gradient_step_is_skipped():
  config = _small(stage2.get_config("tiny"))
  batches = _synthetic_batches(1, 2, 64, config.model.llm.vocab_size)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  model = build_model(config, mesh)
  split, params, frozen = split_model(model, tuple(config.train.trainable))
  # Poison one trainable weight with a NaN: the loss is NaN, the update must be skipped.
  key = sorted(train_state_flat(params))[0]
  poisoned = jax.tree.map(lambda x: x, params)
  _set(poisoned, key, np.full_like(_get(params, key), np.nan))
  tx, schedule = optim.make_optimizer(params, split.trainable_axes, config.train)
  state = dict(params=poisoned, opt_state=tx.init(params), step=jnp.int32(3))
  step = jax.jit(train_step.make_train_step(split, tx, schedule, config))
  new_state, metrics = step(state, frozen, batches)
  assert not np.isfinite(metrics["loss"])
  assert int(metrics["nonfinite_consecutive"]) == 1 and int(metrics["nonfinite_total"]) == 1
  for a, b in zip(jax.tree.leaves(poisoned), jax.tree.leaves(new_state["params"])):
    np.testing.assert_array_equal(a, b)   # nothing moved


def train_state_flat(tree, prefix=()):
  out = []
  for k, v in tree.items():
    out += train_state_flat(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
  return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def test_wrong_shape_weights_are_refused_with_names():
  config = stage2.get_config("tiny")
  model = build_model(config, None)
  from flax import nnx
  some = next(iter(jax.tree_util.tree_leaves_with_path(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))))
  path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in some[0])
  bad = {path: np.zeros((3, 3), np.float32), ("llm", "no_such_weight"): np.zeros(2)}
  with pytest.raises(ValueError, match="shape mismatches: .*checkpoint \\(3, 3\\) vs model") as e:
    assign_params(model, bad, source="somewhere")
  assert "llm.no_such_weight" in str(e.value)
