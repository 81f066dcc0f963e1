"""Attention with the mask given by segment ids and positions (DESIGN §5).

Token i may attend to key j iff `segment_ids[i] == kv_segment_ids[j] != 0` and (not causal or
`positions[i] >= kv_positions[j]`). Because the mask comes from ids that travel with the
tokens, any token order (contiguous, zigzag, a KV cache) is handled the same way.

`dot_product_attention` is the dense reference: it builds the full [S, S] score matrix and is
only meant for tests and short sequences. `attention` is what models call: it picks the ring
(sequence sharded over a mesh axis) or a local kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# [batch, seq, heads, head_dim] throughout.


def attention_mask(segment_ids, positions, kv_segment_ids, kv_positions, causal: bool):
  """bool [B, Sq, Skv]: which keys each query may see."""
  mask = (segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
  if causal:
    mask &= positions[:, :, None] >= kv_positions[:, None, :]
  return mask


def dot_product_attention(q, k, v, segment_ids, positions, *, causal: bool = True,
                          scale: float | None = None, kv_segment_ids=None, kv_positions=None):
  """Dense reference. q [B,Sq,Hq,D], k/v [B,Skv,Hkv,D] (Hq a multiple of Hkv) -> [B,Sq,Hq,D].

  Softmax statistics are fp32 whatever the input dtype; fully masked rows give zeros.
  """
  kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  kv_positions = positions if kv_positions is None else kv_positions
  b, sq, hq, d = q.shape
  hkv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  # GQA: group the query heads by their KV head instead of repeating K/V.
  qg = q.reshape(b, sq, hkv, hq // hkv, d)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(segment_ids, positions, kv_segment_ids, kv_positions, causal)
  mask = mask[:, None, None]
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, sq, hq, d).astype(q.dtype)


def attention(q, k, v, segment_ids, positions, *, mesh: jax.sharding.Mesh | None = None,
              axis: str = "seq", causal: bool = True, scale: float | None = None,
              q_chunk: int | None = None, kv_chunk: int | None = None, impl: str = "jnp"):
  """The attention models call. With `mesh` whose `axis` has more than one device the
  sequence is sharded and the ring runs; otherwise the local kernel does."""
  if mesh is not None and mesh.shape.get(axis, 1) > 1:
    from vita_jax.ops.ring_attention import ring_attention
    return ring_attention(q, k, v, segment_ids, positions, mesh=mesh, axis=axis, causal=causal,
                          scale=scale)
  return dot_product_attention(q, k, v, segment_ids, positions, causal=causal, scale=scale)
