"""The dense reference against a naive loop, and every local kernel against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.ops import attention as attn
from vita_jax.ops.attention import attention, dot_product_attention
from vita_jax.parallel import make_mesh

B, S, HQ, HKV, D = 2, 48, 4, 2, 8


def inputs(seed=0, seq_len=S):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, seq_len, HQ, D)).astype(np.float32)
  k = rng.normal(size=(B, seq_len, HKV, D)).astype(np.float32)
  v = rng.normal(size=(B, seq_len, HKV, D)).astype(np.float32)
  seg = np.ones((B, seq_len), np.int32)
  seg[0, seq_len // 3:] = 2
  seg[0, -5:] = 0  # padding
  pos = np.tile(np.arange(seq_len, dtype=np.int32), (B, 1))
  pos[0, seq_len // 3:] -= seq_len // 3  # positions restart in the second sample
  return q, k, v, seg, pos


def naive_attention(q, k, v, seg, pos, causal):
  """One query at a time in float64, K/V head repeated explicitly (an independent reference)."""
  out = np.zeros(q.shape, np.float64)
  group = q.shape[2] // k.shape[2]
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      for i in range(q.shape[1]):
        keys = [j for j in range(q.shape[1]) if seg[b, i] != 0 and seg[b, j] == seg[b, i]
                and (not causal or pos[b, i] >= pos[b, j])]
        if not keys:
          continue
        s = np.array([q[b, i, h] @ k[b, j, h // group] for j in keys]) / np.sqrt(q.shape[3])
        p = np.exp(s - s.max())
        out[b, i, h] = (p / p.sum()) @ v[b, keys, h // group]
  return out


@pytest.mark.parametrize("causal", [True, False])
def test_dense_reference_matches_naive_loop(causal):
  q, k, v, seg, pos = inputs(seq_len=16)
  got = dot_product_attention(*map(jnp.asarray, (q, k, v, seg, pos)), causal=causal)
  np.testing.assert_allclose(got, naive_attention(q, k, v, seg, pos, causal), atol=1e-5)


def value_and_grads(fn, q, k, v, seg, pos):
  w = jax.random.normal(jax.random.key(1), q.shape)

  def loss(q, k, v):
    out = fn(q, k, v, seg, pos)
    return jnp.sum(out * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("impl, q_chunk, kv_chunk", [
    ("jnp", 16, 8), ("jnp", 20, 13), ("xla", None, None), ("dense", None, None)])
def test_local_kernels_match_reference(impl, q_chunk, kv_chunk):
  q, k, v, seg, pos = map(jnp.asarray, inputs())
  want_out, want_grads = value_and_grads(dot_product_attention, q, k, v, seg, pos)
  fn = lambda *a: attention(*a, impl=impl, q_chunk=q_chunk, kv_chunk=kv_chunk)
  out, grads = value_and_grads(fn, q, k, v, seg, pos)
  np.testing.assert_allclose(out, want_out, atol=1e-5)
  for g, want in zip(grads, want_grads):
    np.testing.assert_allclose(g, want, atol=1e-4)
  pad = np.asarray(seg) == 0
  assert np.all(out[pad] == 0) and all(np.all(g[pad] == 0) for g in grads)


def test_fully_padded_batch_gives_zeros_not_nan():
  q, k, v, seg, pos = map(jnp.asarray, inputs())
  seg = jnp.zeros_like(seg)
  for impl in ("jnp", "dense"):
    fn = functools.partial(attention, impl=impl)
    out, grads = value_and_grads(fn, q, k, v, seg, pos)
    assert np.all(out == 0) and all(np.all(g == 0) for g in grads), impl


def test_attention_on_a_mesh_without_sequence_sharding():
  """data=2 x tensor=4: the same chunked kernel runs per device on its batch and head shard."""
  q, k, v, seg, pos = map(jnp.asarray, inputs())
  k, v = jnp.tile(k, (1, 1, 2, 1)), jnp.tile(v, (1, 1, 2, 1))  # 4 KV heads over tensor=4
  mesh = make_mesh({"data": 2, "tensor": 4})
  got = jax.jit(lambda *a: attention(*a, mesh=mesh, q_chunk=16, kv_chunk=16))(q, k, v, seg, pos)
  np.testing.assert_allclose(got, dot_product_attention(q, k, v, seg, pos), atol=1e-5)


def test_kernel_hook_and_unknown_impl():
  calls = []

  def my_kernel(q, k, v, segment_ids, positions, *, causal, scale, q_chunk, kv_chunk):
    calls.append(scale)
    return dot_product_attention(q, k, v, segment_ids, positions, causal=causal, scale=scale)

  attn.register_kernel("test_hook", my_kernel)
  try:
    q, k, v, seg, pos = map(jnp.asarray, inputs())
    attention(q, k, v, seg, pos, impl="test_hook")
    assert calls == [D ** -0.5]
  finally:
    attn.LOCAL_KERNELS.pop("test_hook")
  with pytest.raises(ValueError, match="impl='nope' is unknown"):
    attention(q, k, v, seg, pos, impl="nope")


def _layer_scan_grad_temp_bytes(seq_len: int, remat: bool) -> int:
  """XLA's temporary bytes for grad of a 2-layer lax.scan whose layers run the tiled kernel."""
  from jax import lax

  from vita_jax.ops.ring_attention import blockwise_attention
  seg = jnp.ones((1, seq_len), jnp.int32)
  pos = jnp.arange(seq_len, dtype=jnp.int32)[None]

  def layer(x, w):
    q = jnp.repeat((x @ w)[:, :, None], 2, axis=2)                 # [1, S, 2, 16]
    out = blockwise_attention(q, q, q, seg, pos, q_chunk=256, kv_chunk=256)
    return x + out.mean(axis=2), None

  def loss(ws, x):
    return (lax.scan(jax.checkpoint(layer) if remat else layer, x, ws)[0] ** 2).sum()

  args = (jnp.full((2, 16, 16), 0.01), jnp.ones((1, seq_len, 16)))
  return jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_remat"])
def test_tiles_stay_tiles_under_a_layer_scan_and_grad(remat):
  """The tile masks depend only on the ids, constants of the layer scan; JAX once hoisted them
  out of the loop and stored every tile's at once (an S x S array: 185 MiB of temporaries at
  4,096 tokens, 3.5x those at 2,048). The memory must grow linearly with the sequence."""
  small, large = (_layer_scan_grad_temp_bytes(s, remat) for s in (2048, 4096))
  assert large < 2.5 * small, (small, large)
  assert large < 4096 * 4096 * 4 / 2, large       # well under one fp32 S x S matrix (64 MiB)
