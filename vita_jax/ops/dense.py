"""The dense reference attention and the mask rule every kernel shares.

Token i may attend to key j iff `segment_ids[i] == kv_segment_ids[j] != 0` and (not causal or
`positions[i] >= kv_positions[j]`). Because the mask comes from ids that travel with the
tokens, any token order (contiguous, zigzag, a KV cache) is handled the same way.

`partial_attention` computes the whole [Sq, Skv] score matrix and returns the normalised output
with its log-sum-exp, so results over disjoint key sets merge exactly (decoding over a sharded
cache uses that); `dot_product_attention` is its output alone: the reference the tests hold
every kernel to. Both are for tests and short key sets only.
"""

from __future__ import annotations

import jax.numpy as jnp

# [batch, seq, heads, head_dim] throughout.


def attention_mask(segment_ids, positions, kv_segment_ids, kv_positions, causal: bool):
  """bool [B, Sq, Skv]: which keys each query may see."""
  mask = (segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
  if causal:
    mask &= positions[:, :, None] >= kv_positions[:, None, :]
  return mask


def partial_attention(q, k, v, q_seg, q_pos, kv_seg, kv_pos, *, causal: bool = True,
                      scale: float | None = None):
  """Softmax of q [B,Q,Hq,D] over one key set k/v [B,K,Hkv,D] (Hq a multiple of Hkv) ->
  (normalised out fp32 [B,Q,Hkv,G,D], lse fp32 [B,Q,Hkv,G]; -inf where nothing is visible).

  GQA groups the query heads by their KV head instead of repeating K/V. Softmax statistics are
  fp32 whatever the input dtype; fully masked rows give zeros.
  """
  b, sq, hq, d = q.shape
  hkv = k.shape[2]
  scale = d ** -0.5 if scale is None else float(scale)
  qg = q.reshape(b, sq, hkv, hq // hkv, d)
  s = jnp.einsum("bqhgd,bkhd->bqhgk", qg, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(q_seg, q_pos, kv_seg, kv_pos, causal)[:, :, None, None, :]
  s = jnp.where(mask, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(mask, jnp.exp(s - row_max[..., None]), 0.0)
  denom = jnp.sum(p, axis=-1)
  out = jnp.einsum("bqhgk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / jnp.where(denom == 0, 1.0, denom)[..., None]
  lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
  return out, lse


def dot_product_attention(q, k, v, segment_ids, positions, *, causal: bool = True,
                          scale: float | None = None, kv_segment_ids=None, kv_positions=None):
  """Dense reference. q [B,Sq,Hq,D], k/v [B,Skv,Hkv,D] (Hq a multiple of Hkv) -> [B,Sq,Hq,D]."""
  kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  kv_positions = positions if kv_positions is None else kv_positions
  out, _ = partial_attention(q, k, v, segment_ids, positions, kv_segment_ids, kv_positions,
                             causal=causal, scale=scale)
  return out.reshape(q.shape).astype(q.dtype)
