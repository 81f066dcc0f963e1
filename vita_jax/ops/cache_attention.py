"""Decode-time attention to a KV cache sharded over the sequence (docs/design.md#contracts).

A few new queries (replicated) attend to the prompt cache sharded over a mesh axis: each shard
takes a softmax over its own slice (`partial_attention`) and the partials are merged by
log-sum-exp across shards (`merge_across`), never gathering the cache. The generated tokens'
K/V live in a small replicated buffer, merged in with `merge_partials`.

Shapes: q [B, Q, Hq, D]; k/v [B, S, Hkv, D]; segment ids / positions int32 [B, *].
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from vita_jax.ops.attention_tiles import merge_across, merge_partials
from vita_jax.ops.dense import partial_attention


def cache_attention(q, k, v, q_seg, q_pos, kv_seg, kv_pos, *, mesh, axis: str = "seq"):
  """Attention of replicated queries q [B,Q,Hq,D] to a cache k/v [B,S,Hkv,D] sharded over
  `axis` -> (out fp32 [B,Q,Hkv,G,D], lse [B,Q,Hkv,G]), replicated."""
  sharded = mesh is not None and mesh.shape.get(axis, 1) > 1

  def local(q, k, v, q_seg, q_pos, kv_seg, kv_pos):
    out, lse = partial_attention(q, k, v, q_seg, q_pos, kv_seg, kv_pos, causal=True)
    return merge_across(out, lse, axis) if sharded else (out, lse)

  if not sharded:
    return local(q, k, v, q_seg, q_pos, kv_seg, kv_pos)
  rep, seq = P(), P(None, axis)
  return jax.shard_map(local, mesh=mesh, in_specs=(rep, seq, seq, rep, rep, seq, seq),
                       out_specs=(rep, rep), check_vma=True)(q, k, v, q_seg, q_pos, kv_seg,
                                                             kv_pos)


def decode_attention(q, q_seg, q_pos, cache, buffer, *, mesh, axis: str = "seq"):
  """New queries q [B,Q,Hq,D] against the sharded prompt cache and the replicated buffer of
  generated tokens, each given as (k, v, segment_ids, positions) -> fp32 [B,Q,Hkv,G,D]."""
  out_c, lse_c = cache_attention(q, cache[0], cache[1], q_seg, q_pos, cache[2], cache[3],
                                 mesh=mesh, axis=axis)
  out_b, lse_b = partial_attention(q, buffer[0], buffer[1], q_seg, q_pos, buffer[2], buffer[3],
                                   causal=True)
  return merge_partials(out_c, lse_c, out_b, lse_b)[0]
