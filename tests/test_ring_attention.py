"""Ring attention vs the dense reference on 8 fake CPU devices: forward, gradients, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vita_jax.ops.attention import attention, dot_product_attention
from vita_jax.ops.attention_tiles import FULL, MASKED, SKIP, may_attend, tile_kind, tile_kinds
from vita_jax.ops.ring_attention import blockwise_attention, ring_attention
from vita_jax.parallel import make_mesh
from vita_jax.spec.zigzag import unzigzag, zigzag

B, S, HQ, D = 2, 256, 8, 16


def packed_batch(seq_len=S, batch=B):
  """Row 0: three packed samples with positions reset per sample (stages 1-2), then padding.
  Row 1: one running sequence (stages 3-4) ending in padding. Samples cross shard boundaries."""
  seg = np.zeros((batch, seq_len), np.int32)
  pos = np.zeros((batch, seq_len), np.int32)
  bounds = [0, int(seq_len * 0.27), int(seq_len * 0.66), int(seq_len * 0.9)]
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    seg[0, lo:hi] = i + 1
    pos[0, lo:hi] = np.arange(hi - lo)
  pos[0, bounds[-1]:] = 7  # padding positions are arbitrary
  seg[1:, :int(seq_len * 0.95)] = 1
  pos[1:] = np.arange(seq_len)
  return jnp.asarray(seg), jnp.asarray(pos)


def random_qkv(hkv, dtype=jnp.float32, seed=0, seq_len=S):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, seq_len, HQ, D), dtype)
  k = jax.random.normal(keys[1], (B, seq_len, hkv, D), dtype)
  v = jax.random.normal(keys[2], (B, seq_len, hkv, D), dtype)
  w = jax.random.normal(keys[3], (B, seq_len, HQ, D), jnp.float32)  # cotangent
  return q, k, v, w


def value_and_grads(fn, q, k, v, w):
  """(out, (dq, dk, dv)) of sum(fn(q, k, v) * w) in one compiled call, as numpy."""
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out), tuple(np.asarray(g) for g in grads)


@functools.cache
def dense_reference(hkv, seed, causal=True):
  """Dense output and gradients for the packed batch (cached: several tests share them)."""
  seg, pos = packed_batch()
  q, k, v, w = random_qkv(hkv=hkv, seed=seed)
  return value_and_grads(lambda q, k, v: dot_product_attention(
      q, k, v, seg, pos, causal=causal), q, k, v, w)


def assert_close(ring, dense, fwd_tol, grad_tol):
  out, grads = ring
  ref_out, ref_grads = dense
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref_out, atol=fwd_tol, rtol=0)
  for name, g, ref in zip("qkv", grads, ref_grads):
    assert np.max(np.abs(g - ref)) <= grad_tol, f"d{name}: {np.max(np.abs(g - ref))}"


@pytest.mark.parametrize("shards", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_matches_dense_contiguous(shards, causal):
  seg, pos = packed_batch()
  q, k, v, w = random_qkv(hkv=2)
  mesh = make_mesh({"seq": shards, "data": -1})
  ring = value_and_grads(lambda q, k, v: ring_attention(
      q, k, v, seg, pos, mesh=mesh, causal=causal, q_chunk=32, kv_chunk=16), q, k, v, w)
  assert_close(ring, dense_reference(2, 0, causal), 1e-5, 1e-4)
  # Padding rows: zero output and zero gradient for their q, k and v.
  pad = np.asarray(seg) == 0
  assert np.all(ring[0][pad] == 0)
  assert all(np.all(g[pad] == 0) for g in ring[1])


@pytest.mark.parametrize("shards, hkv", [(2, 2), (8, 1)])
def test_ring_matches_dense_zigzag(shards, hkv):
  """Inputs in the zigzag layout; un-zigzagged outputs and gradients equal the dense ones."""
  seg, pos = packed_batch()
  q, k, v, w = random_qkv(hkv=hkv, seed=0)
  mesh = make_mesh({"seq": shards, "data": -1})
  zz = lambda x: zigzag(x, shards)
  zseg, zpos = zz(seg), zz(pos)
  out, grads = value_and_grads(lambda q, k, v: ring_attention(
      q, k, v, zseg, zpos, mesh=mesh, q_chunk=16, kv_chunk=32), zz(q), zz(k), zz(v), zz(w))
  ring = unzigzag(out, shards), tuple(unzigzag(g, shards) for g in grads)
  assert_close(ring, dense_reference(hkv, 0), 1e-5, 1e-4)


@pytest.mark.parametrize("mesh_cfg", [{"data": 2, "seq": 4}, {"data": 2, "seq": 2, "tensor": 2}])
def test_ring_with_batch_and_head_sharding(mesh_cfg):
  """Batch over data and heads over tensor as well as the sequence over seq."""
  seg, pos = packed_batch()
  q, k, v, w = random_qkv(hkv=2, seed=0)
  mesh = make_mesh(mesh_cfg)
  spec = NamedSharding(mesh, P("data", "seq", "tensor" if "tensor" in mesh_cfg else None))
  q, k, v, w = (jax.device_put(x, spec) for x in (q, k, v, w))
  ring = value_and_grads(lambda q, k, v: attention(
      q, k, v, seg, pos, mesh=mesh, q_chunk=64, kv_chunk=64), q, k, v, w)
  assert_close(ring, dense_reference(2, 0), 1e-5, 1e-4)


def test_ring_bf16_inputs():
  seg, pos = packed_batch()
  q, k, v, w = random_qkv(hkv=2, dtype=jnp.bfloat16, seed=3)
  mesh = make_mesh({"seq": 4, "data": -1})
  out, grads = value_and_grads(lambda q, k, v: ring_attention(
      q, k, v, seg, pos, mesh=mesh, q_chunk=32, kv_chunk=32), q, k, v, w)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = value_and_grads(lambda q, k, v: dot_product_attention(
      q, k, v, seg, pos), f32(q), f32(k), f32(v), w)
  assert out.dtype == jnp.bfloat16
  for got, ref in [(out, ref_out), *zip(grads, ref_grads)]:
    err = np.max(np.abs(np.asarray(got, np.float32) - ref))
    assert err <= 2e-2 * max(1.0, np.max(np.abs(ref))), err


def test_block_skipping_decision():
  ids = lambda *x: jnp.asarray([x], jnp.int32)
  # causal: queries at positions 0..3 cannot see keys at 4..7; the reverse can.
  assert not may_attend(ids(1, 1), ids(0, 3), ids(1, 1), ids(4, 7), causal=True)
  assert may_attend(ids(1, 1), ids(4, 7), ids(1, 1), ids(0, 3), causal=True)
  assert may_attend(ids(1, 1), ids(0, 3), ids(1, 1), ids(4, 7), causal=False)
  # disjoint segment ranges, and all-padding blocks, are skipped
  assert not may_attend(ids(1, 2), ids(9, 9), ids(3, 4), ids(0, 0), causal=True)
  assert not may_attend(ids(0, 0), ids(9, 9), ids(1, 1), ids(0, 0), causal=False)
  # padding keys' positions do not keep a block alive
  assert not may_attend(ids(1, 1), ids(0, 1), ids(0, 1), ids(0, 5), causal=True)


def test_tile_kind_decision():
  ids = lambda *rows: jnp.asarray(rows, jnp.int32)
  one = ids([1, 1])
  kind = lambda *a, causal=True: int(tile_kind(*a, causal=causal))
  # keys 0..1 are all before queries 2..3 of the same segment: nothing to mask
  assert kind(one, ids([2, 3]), one, ids([0, 1])) == FULL
  assert kind(one, ids([1, 2]), one, ids([0, 1])) == FULL     # a key at the query's position
  assert kind(one, ids([0, 2]), one, ids([0, 1])) == MASKED   # query 0 cannot see key 1
  assert kind(one, ids([0, 1]), one, ids([2, 3])) == SKIP
  assert kind(one, ids([0, 1]), one, ids([2, 3]), causal=False) == FULL
  # a second segment, or padding, on either side needs the mask
  assert kind(ids([1, 2]), ids([5, 6]), one, ids([0, 1])) == MASKED
  assert kind(one, ids([5, 6]), ids([1, 0]), ids([0, 1])) == MASKED
  assert kind(ids([0, 0]), ids([5, 6]), ids([0, 0]), ids([0, 1])) == SKIP
  # rows of a batch may hold different segments; every row must be unmasked
  assert kind(ids([1, 1], [2, 2]), ids([4, 5], [4, 5]), ids([1, 1], [2, 2]),
              ids([0, 1], [0, 1])) == FULL
  assert kind(ids([1, 1], [2, 2]), ids([4, 5], [4, 5]), ids([1, 1], [1, 1]),
              ids([0, 1], [0, 1])) == MASKED


@pytest.mark.parametrize("causal", [True, False])
def test_tile_kinds_of_a_block_equal_tile_kind_tile_by_tile(causal):
  """The vectorised kinds the tile loops read, against the per-tile rule, on packed, padded,
  zigzagged ids (every kind occurs)."""
  rng = np.random.default_rng(3)
  seg = np.sort(rng.integers(1, 4, size=(2, 64)), axis=1).astype(np.int32)
  seg[1, 40:] = 0                                                   # padding
  seg[0] = 1
  pos = np.zeros_like(seg)
  for b in range(2):
    for s_id in np.unique(seg[b]):
      where = seg[b] == s_id
      pos[b, where] = np.arange(where.sum())
  for shards in (1, 4):
    zseg, zpos = (np.asarray(zigzag(jnp.asarray(x), shards)) for x in (seg, pos))
    for r, o in ((0, 0), (0, shards - 1), (shards - 1, 0)):
      block = lambda x, n, w=64 // shards: jnp.asarray(x[:, n * w:(n + 1) * w])
      q_ids = jnp.stack([block(zseg, r), block(zpos, r)])
      kv_ids = jnp.stack([block(zseg, o), block(zpos, o)])
      for cq, ck in ((4, 4), (8, 4), (16, 8)):
        got = np.asarray(tile_kinds(q_ids, kv_ids, cq, ck, causal))
        want = [[int(tile_kind(q_ids[0, :, i * cq:(i + 1) * cq], q_ids[1, :, i * cq:(i + 1) * cq],
                               kv_ids[0, :, j * ck:(j + 1) * ck],
                               kv_ids[1, :, j * ck:(j + 1) * ck], causal))
                 for j in range(q_ids.shape[2] // ck)] for i in range(q_ids.shape[2] // cq)]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("causal", [True, False])
def test_unmasked_tiles_match_dense(causal):
  """One sequence without padding, zigzag over 4 shards, 16-token tiles, GQA (4 query heads per
  KV head): most tiles take the no-mask path, the rest the masked one; both equal dense."""
  shards, hkv, chunk = 4, 2, 16
  seg = jnp.ones((B, S), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  zz = lambda x: zigzag(x, shards)
  zseg, zpos = zz(seg), zz(pos)
  # the layout really exercises every kind of tile
  local = lambda x, r, t: x[:, r * S // shards:(r + 1) * S // shards][:, t * chunk:(t + 1) * chunk]
  tiles = S // shards // chunk
  kinds = {int(tile_kind(local(zseg, r, i), local(zpos, r, i), local(zseg, o, j),
                         local(zpos, o, j), causal))
           for r in range(shards) for o in range(shards) for i in range(tiles)
           for j in range(tiles)}
  assert kinds == ({SKIP, FULL, MASKED} if causal else {FULL})
  q, k, v, w = random_qkv(hkv=hkv, seed=5)
  mesh = make_mesh({"seq": shards, "data": -1})
  out, grads = value_and_grads(lambda q, k, v: ring_attention(
      q, k, v, zseg, zpos, mesh=mesh, causal=causal, q_chunk=chunk, kv_chunk=chunk),
      zz(q), zz(k), zz(v), zz(w))
  ring = unzigzag(out, shards), tuple(unzigzag(g, shards) for g in grads)
  dense = value_and_grads(lambda q, k, v: dot_product_attention(
      q, k, v, seg, pos, causal=causal), q, k, v, w)
  assert_close(ring, dense, 1e-5, 1e-4)


def test_blockwise_odd_length_and_unequal_chunks():
  """Single device, 100 tokens, 24- and 16-token tiles (padded to a common multiple)."""
  seg, pos = packed_batch(seq_len=100)
  q, k, v, w = random_qkv(hkv=2, seed=7, seq_len=100)
  got = value_and_grads(lambda q, k, v: blockwise_attention(
      q, k, v, seg, pos, q_chunk=24, kv_chunk=16), q, k, v, w)
  want = value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, seg, pos), q, k, v, w)
  assert_close(got, want, 1e-5, 1e-4)


def test_indivisible_length_is_a_clear_error():
  seg, pos = packed_batch(seq_len=100)
  q, k, v, _ = random_qkv(hkv=2, seq_len=100)
  with pytest.raises(ValueError, match="not divisible by the 8 shards.*pad it to 104"):
    ring_attention(q, k, v, seg, pos, mesh=make_mesh({"seq": 8}))


def _grad_memory(fn, mesh=None, seq_len=65536, chunk=128):
  """Compile (never run) the gradient of a 1-head x 32 attention; bytes per device."""
  x = jax.ShapeDtypeStruct((1, seq_len, 1, 32), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  loss = lambda q, k, v, s, p: fn(q, k, v, s, p, q_chunk=chunk, kv_chunk=chunk).sum()
  shardings = {}
  if mesh is not None:
    shardings = {"in_shardings": NamedSharding(mesh, P(None, "seq"))}
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), **shardings).lower(
      x, x, x, ids, ids).compile()
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def test_gradient_memory_per_device_scales_with_shards():
  """64K tokens: each of 8 devices holds O(S/8), far below the single-device figure.

  The ring keeps ~9 local-block-sized buffers (K/V and dK/dV in flight, dq, out, dout) where a
  single device keeps ~2 full-length ones, so the ratio is ~0.22 rather than exactly 1/8;
  halving the shards doubles the per-device memory.
  """
  single = _grad_memory(blockwise_attention)

  def ring(shards):
    mesh = make_mesh({"seq": shards, "data": -1})
    return _grad_memory(lambda *a, **kw: ring_attention(*a, mesh=mesh, **kw), mesh)

  per_device_8, per_device_4 = ring(8), ring(4)
  print(f"grad memory, 64K tokens: single device {single / 2**20:.1f} MiB, "
        f"ring/4 {per_device_4 / 2**20:.1f} MiB, ring/8 {per_device_8 / 2**20:.1f} MiB")
  assert per_device_8 < 0.3 * single
  assert per_device_8 < 0.6 * per_device_4
  local_block = 65536 // 8 * 32 * 4
  assert per_device_8 < 16 * local_block  # nothing of size S lives on a device


def test_ring_specs_follow_the_sharding_rules():
  """Batch and KV heads inside the ring are placed by LOGICAL_RULES ("batch", "act_kv_heads"),
  the sequence by the ring's axis; an axis that does not divide its dimension is dropped."""
  from vita_jax.ops.ring_attention import _ring_spec
  from vita_jax.parallel import make_mesh
  mesh = make_mesh({"data": 2, "fsdp": 2, "seq": 2, "tensor": 1})
  assert _ring_spec(mesh, "seq", (4, 16, 2, 8)) == P(("data", "fsdp"), "seq", None, None)
  assert _ring_spec(mesh, "seq", (2, 16, 2, 8)) == P("data", "seq", None, None)
  mesh = make_mesh({"data": 1, "fsdp": 2, "seq": 2, "tensor": 2})
  assert _ring_spec(mesh, "seq", (2, 16, 2, 8)) == P("fsdp", "seq", "tensor", None)
  assert _ring_spec(mesh, "seq", (2, 16, 1, 8)) == P("fsdp", "seq", None, None)
  assert _ring_spec(mesh, "fsdp", (2, 16, 2, 8)) == P(None, "fsdp", "tensor", None)
