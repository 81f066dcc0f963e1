"""float32 compute means float32 matmuls: every dot of a float32 model (vision tower, projector,
decoder, LM head, the decode step) is lowered at HIGHEST precision, so GPUs (TF32) and TPUs
(bf16 passes) keep the 1e-4 parity budget; a bf16 model keeps the fast default."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from vita_jax.models import decoding
from vita_jax.models.vlm import LongVITA
from vita_jax.spec import model as spec_model


def tiny(compute_dtype):
  cfg = base.model_config("tiny")
  cfg.vision = spec_model.vision_config(28, 7, hidden=16, layers=1, heads=2, mlp=32)
  cfg.llm = spec_model.llm_config(vocab=64, hidden=24, layers=1, heads=3, kv_heads=1, ffn=40)
  cfg.projector.hidden_size = 24
  cfg.compute_dtype, cfg.remat = compute_dtype, "none"
  cfg.tokens.img_context_id = 5
  return LongVITA(cfg, rngs=nnx.Rngs(0))


def dots(hlo: str) -> list[str]:
  """The dot_general ops of a StableHLO module, one line each."""
  return [line for line in hlo.splitlines() if "dot_general" in line]


def forward_hlo(model):
  ids = np.full((1, 12), 7, np.int32)
  ids[0, 2:6] = model.config.tokens.img_context_id          # one 28-px tile = 4 tokens
  pixels = np.zeros((1, 28, 28, 3), np.float32)
  return nnx.jit(lambda m, i, p: m(i, p)).lower(model, ids, pixels).as_text()


@pytest.mark.parametrize("dtype, highest", [("float32", True), ("bfloat16", False)])
def test_forward_matmul_precision_follows_compute_dtype(dtype, highest):
  lines = dots(forward_hlo(tiny(dtype)))
  assert len(lines) >= 8                    # vision qkv/o/mlp, projector, decoder, head
  marked = [bool(re.search(r"HIGHEST", line)) for line in lines]
  assert all(marked) if highest else not any(marked), "\n".join(lines)


def test_decode_step_is_highest_in_float32():
  model = tiny("float32")
  graphdef, state = nnx.split(model)
  c = model.llm.cfg
  kv = jnp.zeros((c.num_layers, 1, 4, c.num_kv_heads, c.head_dim))
  ids = jnp.ones((1, 4), jnp.int32)
  cache = decoding.Cache(kv, kv, ids, jnp.arange(4)[None], kv, kv)
  st = decoding.Decoding(cache=cache, tokens=jnp.zeros((1, 4), jnp.int32), count=jnp.int32(1),
                         limit=jnp.int32(4), prompt_len=jnp.int32(4), done=jnp.zeros(1, bool),
                         key=jax.random.key(0))
  step = jax.jit(lambda s, st: decoding.decode_step(
      graphdef, s, st, mesh=None, sampling=decoding.Sampling(), eos_id=1, pad_id=0))
  lines = dots(step.lower(state, st).as_text())
  assert lines and all("HIGHEST" in line for line in lines), "\n".join(lines)
