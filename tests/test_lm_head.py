"""Chunked LM-head loss and select_logits against dense references, on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.ops.lm_head import chunked_cross_entropy, select_logits
from vita_jax.parallel import make_mesh


def dense_cross_entropy(hidden, weight, labels, z_loss=0.0):
  """Reference: full [B, S, V] fp32 logits, summed CE (+ z-loss) over labels >= 0."""
  logits = jnp.einsum("bsd,dv->bsv", hidden, weight, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  mask = labels >= 0
  picked = jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
  row = lse - picked + z_loss * lse ** 2
  return jnp.sum(jnp.where(mask, row, 0.0)), jnp.sum(mask.astype(jnp.int32))


def _inputs(b=2, s=12, d=16, v=40, seed=0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k1, (b, s, d), jnp.float32).astype(dtype)
  weight = (jax.random.normal(k2, (d, v), jnp.float32) * 0.5).astype(dtype)
  labels = jax.random.randint(k3, (b, s), 0, v)
  return hidden, weight, labels


def _masked(labels, kind):
  b, s = labels.shape
  if kind == "partial":
    keep = (np.arange(s) % 3 != 0)[None, :] & np.ones((b, 1), bool)
    keep[1, :] = np.arange(s) > s // 2   # second sequence: only its tail, as an assistant turn
  elif kind == "full_row":
    keep = np.ones((b, s), bool)
    keep[0, :] = False
  elif kind == "one":
    keep = np.zeros((b, s), bool)
    keep[1, 5] = True
  elif kind == "none":
    keep = np.zeros((b, s), bool)
  else:
    keep = np.ones((b, s), bool)
  return jnp.where(jnp.asarray(keep), labels, -100)


def _loss_and_grads(fn, hidden, weight, labels):
  def loss(h, w):
    total, count = fn(h, w, labels)
    # A cotangent other than 1 (as after dividing by the token count) must reach the grads.
    return 0.7 * total, count
  (total, count), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      hidden, weight)
  return total, count, grads


def _assert_close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.all(np.isfinite(a)), "NaN or inf in chunked result"
  np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["all", "partial", "full_row", "one", "none"])
@pytest.mark.parametrize("chunk_size", [5, 64])
def test_matches_dense_fp32(kind, chunk_size, fused):
  hidden, weight, labels = _inputs()
  labels = _masked(labels, kind)
  got = _loss_and_grads(lambda h, w, l: chunked_cross_entropy(h, w, l, chunk_size=chunk_size,
                                                              fused_grad=fused),
                        hidden, weight, labels)
  want = _loss_and_grads(dense_cross_entropy, hidden, weight, labels)
  assert int(got[1]) == int(want[1])
  _assert_close(got[0], want[0], 1e-5)
  for g, w in zip(got[2], want[2]):
    _assert_close(g, w, 1e-5)
  if kind == "none":
    assert float(got[0]) == 0.0 and int(got[1]) == 0
    assert not np.any(np.asarray(got[2][0])) and not np.any(np.asarray(got[2][1]))


@pytest.mark.parametrize("fused", [False, True])
def test_z_loss_matches_dense(fused):
  hidden, weight, labels = _inputs(seed=1)
  labels = _masked(labels, "partial")
  got = _loss_and_grads(lambda h, w, l: chunked_cross_entropy(h, w, l, chunk_size=4, z_loss=1e-3,
                                                              fused_grad=fused),
                        hidden, weight, labels)
  want = _loss_and_grads(lambda h, w, l: dense_cross_entropy(h, w, l, z_loss=1e-3),
                         hidden, weight, labels)
  _assert_close(got[0], want[0], 1e-5)
  for g, w in zip(got[2], want[2]):
    _assert_close(g, w, 1e-5)


def test_max_rows_bounds_loss_and_count():
  hidden, weight, labels = _inputs(seed=2)
  labels = _masked(labels, "partial")
  total, count = chunked_cross_entropy(hidden, weight, labels, chunk_size=3, max_rows=4)
  # The first 4 supervised rows in row-major order are the ones kept.
  flat = np.asarray(labels).reshape(-1)
  keep = np.zeros(flat.shape, bool)
  keep[np.nonzero(flat >= 0)[0][:4]] = True
  want, _ = dense_cross_entropy(hidden, weight, jnp.where(keep.reshape(labels.shape), labels, -100))
  assert int(count) == 4
  _assert_close(total, want, 1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_hidden_close_to_fp32(fused):
  hidden, weight, labels = _inputs(seed=3)
  labels = _masked(labels, "partial")
  want = _loss_and_grads(dense_cross_entropy, hidden, weight, labels)
  got = _loss_and_grads(lambda h, w, l: chunked_cross_entropy(h, w, l, chunk_size=8,
                                                              fused_grad=fused),
                        hidden.astype(jnp.bfloat16), weight, labels)
  assert got[2][0].dtype == jnp.bfloat16
  rel = lambda a, b: float(np.max(np.abs(np.float32(a) - np.float32(b))) /
                           np.max(np.abs(np.float32(b))))
  assert rel(got[0], want[0]) < 2e-2
  assert rel(got[2][0], want[2][0]) < 2e-2
  assert rel(got[2][1], want[2][1]) < 2e-2


@pytest.mark.parametrize("mesh_cfg,fused", [
    ({"tensor": 2, "data": -1}, False),
    ({"tensor": 4, "seq": 2}, False),
    ({"tensor": 4, "seq": 2}, True),
    ({"tensor": 2, "seq": 2, "fsdp": 2}, True),
    ({"data": 8}, False),   # batch 4 does not divide 8: rows replicated, still correct
])
def test_sharded_vocab_matches_unsharded(mesh_cfg, fused):
  mesh = make_mesh(mesh_cfg)
  hidden, weight, labels = _inputs(b=4, s=16, v=48, seed=4)
  labels = _masked(labels, "partial")
  fn = lambda h, w, l, m: chunked_cross_entropy(h, w, l, chunk_size=5, z_loss=1e-4, mesh=m,
                                                fused_grad=fused)
  want = _loss_and_grads(lambda h, w, l: fn(h, w, l, None), hidden, weight, labels)
  got = _loss_and_grads(lambda h, w, l: fn(h, w, l, mesh), hidden, weight, labels)
  assert int(got[1]) == int(want[1])
  _assert_close(got[0], want[0], 1e-5)
  for g, w in zip(got[2], want[2]):
    _assert_close(g, w, 1e-5)


def test_select_logits_matches_full_rows():
  hidden, weight, _ = _inputs(b=2, s=16, v=48, seed=5)
  full = jnp.einsum("bsd,dv->bsv", hidden, weight, preferred_element_type=jnp.float32)
  last = jnp.array([15, 7])
  _assert_close(select_logits(hidden, weight, last), full[jnp.arange(2), last], 1e-6)
  several = jnp.array([[0, 3, 15], [8, 9, 2]])
  want = jnp.take_along_axis(full, several[..., None], axis=1)
  _assert_close(select_logits(hidden, weight, several), want, 1e-6)
  for cfg in ({"seq": 4, "data": 2}, {"seq": 2, "tensor": 4}):
    mesh = make_mesh(cfg)
    got = jax.jit(lambda h, w, i, m=mesh: select_logits(h, w, i, mesh=m))(hidden, weight, several)
    _assert_close(got, want, 1e-6)
    _assert_close(select_logits(hidden, weight, last, mesh=mesh), full[jnp.arange(2), last], 1e-6)


def _temp_bytes(loss_fn, hidden, weight, labels):
  grad = jax.value_and_grad(lambda h, w, l: loss_fn(h, w, l)[0], argnums=(0, 1))
  compiled = jax.jit(grad).lower(hidden, weight, labels).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_32k_tokens_152k_vocab():
  """Compile only: B=1, S=32768, D=256, V=152064 value-and-grad temporaries."""
  hidden = jax.ShapeDtypeStruct((1, 32768, 256), jnp.float32)
  weight = jax.ShapeDtypeStruct((256, 152064), jnp.float32)
  labels = jax.ShapeDtypeStruct((1, 32768), jnp.int32)
  chunked = _temp_bytes(lambda h, w, l: chunked_cross_entropy(h, w, l, chunk_size=512),
                        hidden, weight, labels)
  full = _temp_bytes(dense_cross_entropy, hidden, weight, labels)
  print(f"temp bytes: chunked {chunked / 2**30:.3f} GiB, full logits {full / 2**30:.3f} GiB")
  assert chunked < 1.5e9
  assert full > 10 * chunked


@pytest.mark.parametrize("mesh_cfg", [None, {"tensor": 2, "seq": 2, "data": 2}])
def test_fused_frozen_weight_grads_hidden_only(mesh_cfg):
  """Differentiating only `hidden` (a frozen head) skips the weight gradient and stays exact."""
  mesh = make_mesh(mesh_cfg) if mesh_cfg else None
  hidden, weight, labels = _inputs(b=2, s=16, v=48, seed=5)
  labels = _masked(labels, "partial")
  fn = lambda h, m, fused: 0.7 * chunked_cross_entropy(h, weight, labels, chunk_size=5, mesh=m,
                                                       fused_grad=fused)[0]
  got = jax.jit(jax.grad(lambda h: fn(h, mesh, True)))(hidden)
  want = jax.grad(lambda h: 0.7 * dense_cross_entropy(h, weight, labels)[0])(hidden)
  _assert_close(got, want, 1e-5)
  # The frozen head's program has one matmul fewer per chunk (no [D, V] weight gradient).
  dots = lambda f, *xs: jax.jit(f).lower(*xs).as_text().count("dot_general")
  frozen = dots(jax.grad(lambda h: fn(h, None, True)), hidden)
  both = dots(jax.grad(lambda h, w: 0.7 * chunked_cross_entropy(
      h, w, labels, chunk_size=5, fused_grad=True)[0], argnums=(0, 1)), hidden, weight)
  assert frozen == both - 1, (frozen, both)
