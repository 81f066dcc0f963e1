"""The memory planner: exact parameter accounting, mesh search, CLI, and predicted vs XLA.

The XLA comparisons compile the real train step (abstract inputs, nothing allocated) on the 8
fake CPU devices; they take tens of seconds each, hence a shortened sequence and tile budget.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs import base
from vita_jax import plan
from vita_jax.cli import load_config_file
from vita_jax.generate import bucket_length
from vita_jax.models.vlm import LongVITA
from vita_jax.parallel.mesh import make_mesh
from vita_jax.training import memory_model, optim
from vita_jax.training import state as train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec: str, **data):
  """The config at `spec` with `data` overrides (config.data keys, or "section.key")."""
  config = load_config_file(spec)
  for key, value in data.items():
    section, _, name = key.rpartition(".")
    config[section or "data"][name] = value
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
    # No seq axis: each device runs the same tiled kernel, not dense scores.
    ("configs/stage3.py:tiny", dict(data=1, fsdp=4, seq=1, tensor=1), {}),
    ("configs/stage2.py:tiny", dict(data=2, fsdp=2, seq=1, tensor=2), dict(seq_len=2048)),
    # Four q x kv tiles per ring step under a layer scan and remat (JAX once stored them all).
    ("configs/stage4.py:tiny", dict(data=1, fsdp=1, seq=2, tensor=1),
     {"seq_len": 8192, "model.remat": "full"}),
])
def test_prediction_within_25_percent_of_xla(spec, shape, data):
  config = plan.with_mesh(_config(spec, **data), shape)
  est = memory_model.estimate(config, shape)
  xla = plan.compiled_memory(config, shape)
  assert est.arguments == pytest.approx(xla["argument"], rel=0.01)
  assert est.peak == pytest.approx(xla["peak"], rel=0.25), (est.peak, xla)


# Serving (--serve): vita_jax.generate's prefill on a generation mesh (seq x fsdp x tensor).

# Qwen2.5-14B serving its full 1,048,576-token context: the longest prompt generate accepts with
# 1,024 new tokens (prompt + new tokens <= max_position_embeddings), padded to a 1M bucket.
PROMPT_1M, NEW_1M = 1_048_576 - 1024, 1024


def _row(text: str, label: str) -> float:
  """The GiB figure of the table row that starts with `label`."""
  line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith(label))
  return float(re.search(r"\d+\.\d{3}", line[len(label):]).group())


def test_serve_estimate_of_14b_at_1m_tokens_is_the_arithmetic():
  config = _config("configs/stage4.py")
  serve = plan.serving(config, PROMPT_1M, NEW_1M)
  t = config.model.llm
  for seq, fsdp, tensor in ((8, 1, 1), (16, 2, 4), (32, 1, 8)):
    est = serve.estimate(config, dict(seq=seq, fsdp=fsdp, tensor=tensor))
    assert est.bucket == 1_048_576
    # Weights in bf16 split over fsdp x tensor (norms and biases replicated: a rounding error).
    assert est.weights["LLM"] == pytest.approx(14_770_033_664 * 2 / (fsdp * tensor), rel=0.01)
    # K and V of 48 layers x 1M tokens x 8 KV heads x 128, bf16, split over seq only.
    kv = 2 * t.num_layers * 1_048_576 * t.num_kv_heads * t.head_dim * 2 / seq
    assert est.kv_cache["prompt K/V [layers, B, S/seq, Hkv, hd]"] == kv
  # The planner pads prompts as generate does.
  for n, shards in ((PROMPT_1M, 8), (5, 1), (4097, 4), (1_048_576, 128)):
    assert memory_model.serve_bucket(n, shards) == bucket_length(n, shards)
  # The KV cache halves with twice the sequence shards; the weights do not change.
  a, b = (serve.estimate(config, dict(seq=s, tensor=4)) for s in (8, 16))
  assert sum(a.kv_cache.values()) > 1.9 * sum(b.kv_cache.values())
  assert a.weights == b.weights and a.total > b.total


def test_serve_rejects_a_prompt_longer_than_the_model():
  config = _config("configs/stage4.py")
  with pytest.raises(plan.ConfigError, match="maximum length 1,048,576"):
    plan.serving(config, 1_048_576, max_new_tokens=1)
  assert plan.serving(config, None, 64).prompt_len == 1_048_576 - 64


def test_cli_prints_the_14b_serving_table_for_a_1m_token_prompt():
  out = subprocess.run([sys.executable, "-m", "vita_jax.plan", "--config=configs/stage4.py",
                        "--serve", f"--prompt_len={PROMPT_1M}", f"--max_new_tokens={NEW_1M}",
                        "--mesh=seq:16,fsdp:2,tensor:4", "--device=tpu-v5p"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "Long-VITA 14b · serving 1 × 1,047,552-token prompt (bucket 1,048,576)" in text
  assert "generation mesh seq=16 fsdp=2 tensor=4 (128 devices)" in text
  gib = 1024 ** 3
  assert _row(text, "LLM") == pytest.approx(14_770_033_664 * 2 / 8 / gib, rel=0.01)
  assert _row(text, "prompt K/V") == pytest.approx(2 * 48 * 1_048_576 * 8 * 128 * 2 / 16 / gib,
                                                   abs=0.001)
  total = _row(text, "total")
  assert total == pytest.approx(_row(text, "weights") + _row(text, "KV cache") +
                                _row(text, "prefill activations") +
                                _row(text, "prompt arrays"), abs=0.005)
  assert ": fits (" in text and total < 95


def test_cli_serving_search_names_the_smallest_generation_mesh():
  out = subprocess.run([sys.executable, "-m", "vita_jax.plan", "--config=configs/stage4.py",
                        "--serve", f"--prompt_len={PROMPT_1M}", f"--max_new_tokens={NEW_1M}",
                        "--device=h100"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "generation mesh seq=8 fsdp=1 tensor=1 (8 devices)" in out.stdout
  config = _config("configs/stage4.py")
  serve = plan.serving(config, PROMPT_1M, NEW_1M)
  found = plan.best_serve_mesh(config, serve, 4, 80 * plan.GIB)
  assert found is not None and not found[2]          # half the devices never fits


@pytest.mark.slow
@pytest.mark.parametrize("spec,shape,prompt_len,weights_dtype", [
    ("configs/stage4.py:tiny", dict(seq=8), 8192, None),
    ("configs/stage4.py:small", dict(seq=2, tensor=4), 4096, None),
    ("configs/stage4.py:small", dict(seq=4, fsdp=2), 2048, None),
    # bf16 weights, fp32 compute: prefill casts the stacked layers (CPU has no fast bf16 matmul,
    # so bf16 compute would be upcast by XLA and measure the CPU rather than the model).
    ("configs/stage4.py:small", dict(seq=2, fsdp=2, tensor=2), 4096, "bfloat16"),
])
def test_serve_prediction_within_25_percent_of_xla(spec, shape, prompt_len, weights_dtype):
  config = _config(spec)
  serve = plan.serving(config, prompt_len, 64, weights_dtype=weights_dtype)
  shape = dict(dict(data=1, fsdp=1, seq=1, tensor=1), **shape)
  est = serve.estimate(config, shape)
  xla = plan.compiled_serve_memory(config, serve, shape)
  assert est.prefill_arguments == pytest.approx(xla["argument"], rel=0.01)
  assert est.prefill_outputs == pytest.approx(xla["output"], rel=0.01)
  assert est.prefill_peak == pytest.approx(xla["peak"], rel=0.25), (est.prefill_peak, xla)
