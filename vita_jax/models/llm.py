"""Qwen2 decoder (docs/design.md#model): GQA with q/k/v bias, RoPE from explicit positions,
RMSNorm, SwiGLU, untied or tied LM head.

A decoder layer is split in two pure functions so a KV cache can sit between them:
`layer_qkv` (norm, projections, RoPE) and `layer_finish` (output projection, residual, MLP).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from vita_jax.models.common import exact_in_fp32, param, rms_norm, run_layers, swiglu_mlp, values
from vita_jax.ops.attention import attention
from vita_jax.parallel.sharding import constrain

LAYER_PARAMS = ("attn_norm", "q_kernel", "q_bias", "k_kernel", "k_bias", "v_kernel", "v_bias",
                "o_kernel", "mlp_norm", "gate_kernel", "up_kernel", "down_kernel")
ACT = ("batch", "length", "act_embed")


def rope_tables(positions, head_dim: int, theta: float):
  """cos, sin [B, S, head_dim] (fp32) for integer positions [B, S]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq     # [B, S, head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """x [B, S, H, D]; rotate-half convention (first half pairs with second half)."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def layer_qkv(p: dict, x, cos, sin, eps: float):
  """x [B, S, D] -> q [B, S, Hq, hd], k/v [B, S, Hkv, hd], RoPE applied to q and k."""
  h = rms_norm(x, p["attn_norm"], eps)
  q = jnp.einsum("bsd,dhk->bshk", h, p["q_kernel"]) + p["q_bias"]
  k = jnp.einsum("bsd,dhk->bshk", h, p["k_kernel"]) + p["k_bias"]
  v = jnp.einsum("bsd,dhk->bshk", h, p["v_kernel"]) + p["v_bias"]
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def layer_finish(p: dict, x, attn_out, eps: float):
  """Residual input x [B, S, D] and attention output [B, S, Hq, hd] -> layer output."""
  x = x + jnp.einsum("bshk,hkd->bsd", attn_out, p["o_kernel"])
  h = rms_norm(x, p["mlp_norm"], eps)
  return x + swiglu_mlp(h, p["gate_kernel"], p["up_kernel"], p["down_kernel"])


class DecoderLayers(nnx.Module):
  """The stacked parameters of all decoder layers ([layers, ...])."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype):
    n, d, f = cfg.num_layers, cfg.hidden_size, cfg.ffn_dim
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias_init = "zeros"
    self.attn_norm = param(rngs, (n, d), ("layers", "norm"), dtype, "ones")
    self.q_kernel = param(rngs, (n, d, hq, hd), ("layers", "embed", "heads", "head_dim"), dtype)
    self.q_bias = param(rngs, (n, hq, hd), ("layers", "heads", "head_dim"), dtype, bias_init)
    for name in ("k", "v"):
      setattr(self, f"{name}_kernel",
              param(rngs, (n, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), dtype))
      setattr(self, f"{name}_bias",
              param(rngs, (n, hkv, hd), ("layers", "kv_heads", "head_dim"), dtype, bias_init))
    self.o_kernel = param(rngs, (n, hq, hd, d), ("layers", "heads", "head_dim", "embed"), dtype)
    self.mlp_norm = param(rngs, (n, d), ("layers", "norm"), dtype, "ones")
    self.gate_kernel = param(rngs, (n, d, f), ("layers", "embed", "mlp"), dtype)
    self.up_kernel = param(rngs, (n, d, f), ("layers", "embed", "mlp"), dtype)
    self.down_kernel = param(rngs, (n, f, d), ("layers", "mlp", "embed"), dtype)


class Qwen2(nnx.Module):
  """Embedding, decoder stack, final norm and LM head of a Qwen2 model."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, param_dtype="float32", compute_dtype="float32",
               remat="none", scan_layers=True, attention_cfg=None):
    if not cfg.qkv_bias:
      raise ValueError("llm.qkv_bias=False is not supported: Qwen2 has q/k/v biases")
    self.cfg = cfg
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.remat = remat
    self.scan_layers = scan_layers
    self.attention_cfg = dict(attention_cfg or {})
    v, d = cfg.vocab_size, cfg.hidden_size
    self.embedding = param(rngs, (v, d), ("vocab", "embed"), param_dtype)
    self.layers = DecoderLayers(cfg, rngs=rngs, dtype=param_dtype)
    self.final_norm = param(rngs, (d,), ("norm",), param_dtype, "ones")
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (d, v), ("embed", "vocab"), param_dtype)

  def embed(self, input_ids):
    """int [B, S] -> [B, S, D] in the compute dtype."""
    return jnp.take(self.embedding[...], input_ids, axis=0).astype(self.compute_dtype)

  def layer_params(self) -> dict:
    """{name: [L, ...]} in the compute dtype (for scanning, or a cached decode loop)."""
    return values(self.layers, LAYER_PARAMS, self.compute_dtype)

  @exact_in_fp32
  def __call__(self, x, positions, segment_ids, *, mesh=None):
    """Embeddings x [B, S, D] -> final-normed hidden states [B, S, D] (compute dtype)."""
    cfg = self.cfg
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    eps = cfg.rms_norm_eps
    attn_kwargs = dict(mesh=mesh, causal=True, **self.attention_cfg)

    def body(x, p):
      q, k, v = layer_qkv(p, x, cos, sin, eps)
      o = attention(q, k, v, segment_ids, positions, **attn_kwargs)
      return constrain(layer_finish(p, x, o, eps), ACT, mesh)

    x = constrain(x.astype(self.compute_dtype), ACT, mesh)
    x = run_layers(body, x, self.layer_params(), scan=self.scan_layers, remat_policy=self.remat)
    return rms_norm(x, self.final_norm[...].astype(x.dtype), eps)

  def lm_head_weight(self):
    """[D, V] LM head kernel (the embedding transposed when tied)."""
    if self.cfg.tie_embeddings:
      return self.embedding[...].T
    return self.lm_head[...]

  @exact_in_fp32
  def logits(self, hidden):
    w = self.lm_head_weight().astype(hidden.dtype)
    return jnp.einsum("bsd,dv->bsv", hidden, w, preferred_element_type=jnp.float32)
