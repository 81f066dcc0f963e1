"""Decode attention to a sharded KV cache plus a replicated buffer vs the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vita_jax.ops.attention import dot_product_attention
from vita_jax.ops.cache_attention import decode_attention
from vita_jax.parallel import make_mesh


@pytest.mark.parametrize("shards", [1, 4])
def test_decode_attention_matches_dense(shards):
  b, s, n, hq, hkv, d = 2, 16, 4, 4, 2, 8
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(ks[0], (b, 1, hq, d))
  k, v = (jax.random.normal(x, (b, s, hkv, d)) for x in ks[1:3])
  bk, bv = (jax.random.normal(x, (b, n, hkv, d)) for x in ks[3:5])
  length = np.array([11, 16])                          # row 0 has 5 padding slots
  seg = (np.arange(s)[None] < length[:, None]).astype(np.int32)
  pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
  written = 2                                          # buffer slots 0..1 hold tokens
  buf_seg = np.broadcast_to((np.arange(n) < written).astype(np.int32), (b, n))
  buf_pos = (length[:, None] + np.arange(n)).astype(np.int32)
  q_seg = np.ones((b, 1), np.int32)
  q_pos = (length[:, None] + written - 1).astype(np.int32)
  # The cache in any order: rows are identified by their positions, so shuffle it.
  perm = np.random.default_rng(0).permutation(s)
  cache = (k[:, perm], v[:, perm], seg[:, perm], pos[:, perm])
  mesh = make_mesh({"seq": shards, "data": -1}) if shards > 1 else None
  if mesh is not None:
    cache = tuple(jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in cache)
  got = decode_attention(q, q_seg, q_pos, cache, (bk, bv, buf_seg, buf_pos), mesh=mesh)
  want = dot_product_attention(q, jnp.concatenate([k, bk], 1), jnp.concatenate([v, bv], 1),
                               q_seg, q_pos, kv_segment_ids=np.concatenate([seg, buf_seg], 1),
                               kv_positions=np.concatenate([pos, buf_pos], 1))
  np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, atol=1e-5, rtol=1e-5)
