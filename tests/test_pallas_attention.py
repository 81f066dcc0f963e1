"""The Pallas block kernel (interpret mode on CPU) against the dense reference: the kernel alone
with separate q / kv ids, then through `attention(impl="pallas")` on one device and inside the
ring on 1, 2 and 4 fake devices. Shapes are tiny: interpret mode runs every grid cell in XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.ops import pallas_attention as pa
from vita_jax.ops.attention import attention, auto_impl
from vita_jax.ops.dense import dot_product_attention, partial_attention
from vita_jax.parallel import make_mesh
from vita_jax.spec.zigzag import unzigzag, zigzag

B, S, HQ, D = 2, 32, 4, 8


def packed(seq_len=S):
  """Row 0: samples of 11 and 13 tokens (positions restart, so they cross 8-token tiles and
  ring blocks), then 8 padding tokens (id 0). Row 1: one sequence whose last 3 are padding."""
  seg = np.zeros((B, seq_len), np.int32)
  pos = np.tile(np.arange(seq_len, dtype=np.int32), (B, 1))
  a, b = int(seq_len * 0.35), int(seq_len * 0.75)
  seg[0, :a], seg[0, a:b] = 1, 2
  pos[0, a:b] -= a
  seg[1, :seq_len - 3] = 1
  return jnp.asarray(seg), jnp.asarray(pos)


def qkvw(hkv, seq_len=S, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shapes = [(B, seq_len, HQ, D), (B, seq_len, hkv, D), (B, seq_len, hkv, D), (B, seq_len, HQ, D)]
  return [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes)]


def out_and_grads(fn, q, k, v, w):
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def check(got, ref, fwd_tol=2e-5, grad_tol=1e-4):
  np.testing.assert_allclose(got[0], ref[0], atol=fwd_tol, rtol=0)
  for name, g, r in zip("qkv", got[1], ref[1]):
    err = np.max(np.abs(g - r))
    assert err <= grad_tol * max(1.0, np.max(np.abs(r))), f"d{name}: {err}"


def head_major(q, k, v, hkv):
  """[B,S,H,D] -> the ring's layout: q [B,Hkv,G,S,D], k/v [B,Hkv,S,D]."""
  qh = q.reshape(B, q.shape[1], hkv, HQ // hkv, D).transpose(0, 2, 3, 1, 4)
  return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def test_block_kernel_alone_separate_q_and_kv_ids():
  """One ring step as the ring calls it: 16 queries against a different block of 24 keys (own
  ids: the q block is a later chunk of row 0), GQA 2 groups. Forward (out, natural-log lse,
  -inf for rows that see nothing) and backward (from the global lse) vs the dense softmax."""
  hkv, sq = 2, 16
  seg, pos = packed()
  q, k, v, dout = qkvw(hkv, seed=1)
  q, dout, q_seg, q_pos = q[:, 16:], dout[:, 16:], seg[:, 16:], pos[:, 16:]
  k, v, kv_seg, kv_pos = k[:, :24], v[:, :24], seg[:, :24], pos[:, :24]
  qh, kh, vh = head_major(q, k, v, hkv)
  q_ids, kv_ids = jnp.stack([q_seg, q_pos]), jnp.stack([kv_seg, kv_pos])
  out, lse = jax.jit(lambda *a: pa.block_forward(*a, causal=True, scale=0.3, block_q=8,
                                                 block_k=8))(qh, q_ids, kh, vh, kv_ids)

  def ref(q, k, v):
    return partial_attention(q, k, v, q_seg, q_pos, kv_seg, kv_pos, causal=True, scale=0.3)

  ref_out, ref_lse = jax.jit(ref)(q, k, v)              # [B, Sq, Hkv, G, (D)]
  to_hm = lambda x: jnp.moveaxis(x, 1, 3)               # -> [B, Hkv, G, Sq, (D)]
  np.testing.assert_allclose(out, to_hm(ref_out), atol=2e-6)
  assert np.all(np.isneginf(lse) == np.isneginf(to_hm(ref_lse)))
  assert np.isneginf(lse).any() and np.all(out[np.isneginf(lse)] == 0)   # padding rows
  np.testing.assert_allclose(np.where(np.isneginf(lse), 0, lse),
                             np.where(np.isneginf(lse), 0, to_hm(ref_lse)), atol=2e-6)

  dout_hm = dout.reshape(B, sq, hkv, HQ // hkv, D).transpose(0, 2, 3, 1, 4)
  delta = jnp.sum(dout_hm * out, -1)
  dq, dk, dv = jax.jit(lambda *a: pa.block_backward(*a, causal=True, scale=0.3, block_q=8,
                                                    block_k=8))(
      qh, q_ids, kh, vh, kv_ids, dout_hm, jnp.where(jnp.isneginf(lse), 0.0, lse), delta)
  ref_grads = jax.jit(lambda q, k, v, g: jax.vjp(lambda *x: ref(*x)[0], q, k, v)[1](g))
  rq, rk, rv = ref_grads(q, k, v, dout.reshape(ref_out.shape))
  np.testing.assert_allclose(dq, head_major(rq, rk, rv, hkv)[0], atol=2e-5)
  np.testing.assert_allclose(dk, rk.transpose(0, 2, 1, 3), atol=2e-5)
  np.testing.assert_allclose(dv, rv.transpose(0, 2, 1, 3), atol=2e-5)


@pytest.mark.slow
def test_single_device_odd_length_gqa1():
  """attention(impl="pallas") on one device: 29 tokens padded to whole 8-token tiles, one KV
  head, packed samples and padding rows (zero output, zero gradients)."""
  seq_len = 29
  seg, pos = packed(seq_len)
  q, k, v, w = qkvw(1, seq_len)
  got = out_and_grads(lambda q, k, v: attention(q, k, v, seg, pos, impl="pallas", q_chunk=8,
                                                kv_chunk=8), q, k, v, w)
  check(got, out_and_grads(lambda q, k, v: dot_product_attention(q, k, v, seg, pos), q, k, v, w))
  pad = np.asarray(seg) == 0
  assert np.all(got[0][pad] == 0) and all(np.all(g[pad] == 0) for g in got[1])


def _ring(shards, causal, hkv, zz, dtype=jnp.float32, seq_len=S):
  seg, pos = packed(seq_len)
  q, k, v, w = qkvw(hkv, seq_len, dtype=dtype)
  mesh = make_mesh({"seq": shards, "data": -1})
  lay = (lambda x: zigzag(x, shards)) if zz else (lambda x: x)
  back = (lambda x: unzigzag(x, shards)) if zz else (lambda x: x)
  fn = lambda q, k, v: attention(q, k, v, lay(seg), lay(pos), mesh=mesh, causal=causal,
                                 impl="pallas", q_chunk=8, kv_chunk=8)
  assert "pallas_call" in str(jax.make_jaxpr(fn)(q, k, v))          # impl honoured in the ring
  out, grads = out_and_grads(fn, lay(q), lay(k), lay(v), lay(w))
  f32 = lambda x: x.astype(jnp.float32)
  ref = out_and_grads(lambda q, k, v: dot_product_attention(q, k, v, seg, pos, causal=causal),
                      f32(q), f32(k), f32(v), w)
  return (back(out), [back(g) for g in grads]), ref


def test_ring_zigzag_odd_chunks():
  """2 devices, zigzag, one KV head, 28 tokens: each device holds two 7-token chunks, which
  the ring pads to whole 8-token tiles."""
  check(*_ring(2, True, 1, True, seq_len=28))


@pytest.mark.slow
@pytest.mark.parametrize("shards, causal, hkv, zz", [
    (1, True, 2, False),
    (2, False, 1, False),
    (4, True, 2, True),
    (4, False, 2, False),
    (8, True, 1, True),
])
def test_ring_matches_dense(shards, causal, hkv, zz):
  """Inside the ring (seq sharded; zigzag puts each device's two chunks far apart)."""
  check(*_ring(shards, causal, hkv, zz))


@pytest.mark.slow
def test_ring_bf16():
  got, ref = _ring(2, True, 2, False, dtype=jnp.bfloat16)
  check(got, ref, fwd_tol=3e-2, grad_tol=3e-2)


def test_auto_is_jnp_on_cpu_and_pallas_on_accelerators():
  """impl="auto" resolves by the platform the arrays live on; on CPU it is the jnp kernel."""
  fake = lambda platform: type("Mesh", (), {"devices": np.array([type("D", (), {
      "platform": platform})()])})()
  assert [auto_impl(fake(p)) for p in ("cpu", "gpu", "tpu")] == ["jnp", "pallas", "pallas"]
  assert auto_impl() == "jnp"
  q, k, v, _ = qkvw(2)
  seg, pos = packed()
  run = jax.jit(lambda q, k, v, impl: attention(q, k, v, seg, pos, impl=impl),
                static_argnums=3)
  np.testing.assert_array_equal(np.asarray(run(q, k, v, "auto")), np.asarray(run(q, k, v, "jnp")))
