"""Model FLOPs from the config (vision + projector + LLM incl. attention), and a measured peak.

MFU = model FLOPs per step / (step time x peak). Model FLOPs count what the model needs, not
what remat recomputes (the usual convention, as in MaxText and the PaLM paper).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections

from vita_jax.spec.tokens import tokens_per_tile


def llm_forward_flops_per_token(model: ml_collections.ConfigDict, context: float) -> float:
  """Forward matmul FLOPs for one token attending to `context` keys on average."""
  t = model.llm
  q = t.hidden_size * t.num_heads * t.head_dim
  kv = 2 * t.hidden_size * t.num_kv_heads * t.head_dim
  o = t.num_heads * t.head_dim * t.hidden_size
  mlp = 3 * t.hidden_size * t.ffn_dim
  attn = 2 * 2 * context * t.num_heads * t.head_dim          # QK^T and PV
  head = 2 * t.hidden_size * t.vocab_size
  return t.num_layers * (2 * (q + kv + o + mlp) + attn) + head


def vision_forward_flops_per_tile(model: ml_collections.ConfigDict) -> float:
  """InternViT over one tile plus the projector over its pixel-shuffled tokens."""
  v = model.vision
  n = (v.image_size // v.patch_size) ** 2 + 1
  patch = 2 * (n - 1) * v.patch_size ** 2 * 3 * v.hidden_size
  matmuls = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.mlp_dim
  layer = 2 * n * matmuls + 4 * n * n * v.hidden_size
  shuffled = int(round(v.hidden_size / model.downsample_ratio ** 2))
  proj = 2 * tokens_per_tile(model) * (shuffled * model.projector.hidden_size +
                                       model.projector.hidden_size * model.llm.hidden_size)
  return patch + v.num_layers * layer + proj


def train_flops_per_step(model: ml_collections.ConfigDict, *, batch: int, seq_len: int,
                         tiles: int, trainable=("vision", "projector", "llm"),
                         causal_context: float | None = None) -> float:
  """FLOPs of one optimizer step: forward, activation gradients where something upstream
  trains, and weight gradients of the trainable parts (each a forward's worth)."""
  context = seq_len / 2 if causal_context is None else causal_context
  llm_fwd = batch * seq_len * llm_forward_flops_per_token(model, context)
  vis_fwd = tiles * vision_forward_flops_per_tile(model)
  upstream_trains = "vision" in trainable or "projector" in trainable
  llm = llm_fwd * (1 + (1 if upstream_trains or "llm" in trainable else 0)
                   + (1 if "llm" in trainable else 0))
  vision = vis_fwd * (3 if "vision" in trainable else 1)
  return float(llm + vision)


def measure_peak_flops(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large fp32 matmul on the default device (the CPU's practical peak)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best
