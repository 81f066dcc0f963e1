"""The memory planner: exact parameter accounting, mesh search, CLI, and predicted vs XLA.

The XLA comparisons compile the real train step (abstract inputs, nothing allocated) on the 8
fake CPU devices; they take tens of seconds each, hence a shortened sequence and tile budget.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs import base
from vita_jax import plan
from vita_jax.cli import load_config_file
from vita_jax.models.vlm import LongVITA
from vita_jax.parallel.mesh import make_mesh
from vita_jax.training import memory_model, optim
from vita_jax.training import state as train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec: str, **data):
  config = load_config_file(spec)
  for key, value in data.items():
    config.data[key] = value
  return config


def _qwen2_count(t) -> int:
  """Parameters of a Qwen2 decoder, from its architecture: GQA with q/k/v bias, SwiGLU, RMSNorm."""
  kv = t.num_kv_heads * t.head_dim
  attention = t.hidden_size * (t.num_heads * t.head_dim) * 2 + t.num_heads * t.head_dim + \
      2 * (t.hidden_size * kv + kv)
  layer = attention + 3 * t.hidden_size * t.ffn_dim + 2 * t.hidden_size
  heads = 1 if t.tie_embeddings else 2
  return t.num_layers * layer + heads * t.vocab_size * t.hidden_size + t.hidden_size


def _internvit_count(v) -> int:
  """InternViT: conv patch embedding, CLS token, position table, pre-LN blocks with layer
  scales, fused qkv with bias, GELU MLP."""
  d, m = v.hidden_size, v.mlp_dim
  patches = (v.image_size // v.patch_size) ** 2
  layer = 4 * d + 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
  return v.num_layers * layer + v.patch_size ** 2 * 3 * d + d + d + (1 + patches) * d


@pytest.mark.parametrize("size", ["tiny", "14b"])
def test_param_table_counts_match_the_architectures(size):
  cfg = base.model_config(size)
  counts = {}
  for p in memory_model.param_table(cfg):
    assert len(p.axes) == len(p.shape), p
    counts[p.module] = counts.get(p.module, 0) + math.prod(p.shape)
  d_in = cfg.vision.hidden_size * round(1 / cfg.downsample_ratio) ** 2
  projector = 2 * d_in + d_in * cfg.projector.hidden_size + \
      cfg.projector.hidden_size * cfg.llm.hidden_size
  if cfg.projector.bias:
    projector += cfg.projector.hidden_size + cfg.llm.hidden_size
  assert counts == {"llm": _qwen2_count(cfg.llm), "vision": _internvit_count(cfg.vision),
                    "projector": projector}
  if size == "14b":
    assert counts["llm"] == 14_770_033_664    # Qwen2.5-14B (its safetensors index: 2 bytes each)


def _local_bytes(tree, shardings, min_ndim=0):
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
             if x.ndim >= min_ndim)


def test_local_param_and_adam_bytes_match_the_train_state_shardings():
  config = _config("configs/stage3.py:tiny")
  shape = dict(data=1, fsdp=2, seq=2, tensor=2)
  mesh = make_mesh(shape)
  model = nnx.eval_shape(lambda: LongVITA(config.model, rngs=nnx.Rngs(0), mesh=mesh))
  split, params, frozen = train_state.split_model(model, tuple(config.train.trainable))
  tx, _ = optim.make_optimizer(params, split.trainable_axes, config.train)
  state_sh, frozen_sh = train_state.state_shardings(tx, split, params, frozen, mesh)
  shapes = jax.eval_shape(functools.partial(train_state.initial_state, tx), params)
  real = _local_bytes(shapes["params"], state_sh["params"]) + _local_bytes(frozen, frozen_sh)
  est = memory_model.estimate(config, shape)
  assert est.kept["params (master, all modules)"] == real
  assert 0 < real < sum(math.prod(p.shape) * 4 for p in memory_model.param_table(config.model))
  # Adam's mu and nu (the scalar counters aside) are sharded like their parameters.
  assert est.kept["optimizer (Adam mu + nu)"] == _local_bytes(
      shapes["opt_state"], state_sh["opt_state"], min_ndim=1)


def test_more_sequence_shards_need_less_activation_memory():
  config = _config("configs/stage4.py")
  peaks = [memory_model.estimate(config, dict(seq=s, tensor=8)).peak for s in (4, 8, 16, 32)]
  assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks
  saved = [memory_model.estimate(config, dict(seq=s, tensor=8)).llm_phase[
      "decoder activations (remat=full)"] for s in (8, 16)]
  assert saved[0] == pytest.approx(2 * saved[1])     # halves exactly with twice the shards


def test_best_mesh_is_valid_and_fits_and_search_finds_the_smallest():
  config = _config("configs/stage3.py")
  hbm = 95 * plan.GIB
  found = plan.smallest_fitting_mesh(config, hbm, 1, 4096)
  assert found is not None
  shape, est, fits = found
  n = math.prod(shape.values())
  assert fits and est.peak <= hbm and plan.is_valid(config, shape)
  smaller = plan.best_mesh(config, n // 2, hbm)
  assert smaller is None or not smaller[2]            # half the devices never fits


def test_cli_prints_the_14b_stage4_table():
  out = subprocess.run([sys.executable, "-m", "vita_jax.plan", "--config=configs/stage4.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "Long-VITA 14b · stage 4 · seq_len 1,048,576" in text
  for row in ("params (master, all modules)", "optimizer (Adam mu + nu)", "gradients",
              "decoder activations (remat=full)", "attention blocks", "peak", "step FLOPs"):
    assert row in text
  assert ": fits (" in text


def test_cli_says_when_a_mesh_does_not_fit_and_names_one_that_does():
  out = subprocess.run([sys.executable, "-m", "vita_jax.plan", "--config=configs/stage3.py",
                        "--mesh=seq:8,tensor:1", "--device=h100"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "does NOT fit" in out.stdout and "smallest mesh that fits:" in out.stdout


def test_cli_rejects_a_bad_mesh():
  out = subprocess.run([sys.executable, "-m", "vita_jax.plan", "--config=configs/stage4.py",
                        "--mesh=seqq:8"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "'seqq:8'" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("spec,shape,data", [
    ("configs/stage3.py:tiny", dict(data=1, fsdp=4, seq=2, tensor=1), {}),
    ("configs/stage1.py:small", dict(data=1, fsdp=2, seq=2, tensor=2),
     dict(seq_len=1024, tiles_per_batch=32)),
])
def test_prediction_within_25_percent_of_xla(spec, shape, data):
  config = plan.with_mesh(_config(spec, **data), shape)
  est = memory_model.estimate(config, shape)
  xla = plan.compiled_memory(config, shape)
  assert est.arguments == pytest.approx(xla["argument"], rel=0.01)
  assert est.peak == pytest.approx(xla["peak"], rel=0.25), (est.peak, xla)
