"""LongVITA model: pixel shuffle order, feature placement, layer loop variants (scan / unrolled /
remat, forward and gradients), packing masks, sharded forward, bf16, tied heads.

Transformers parity lives in parity_tests/test_transformers_parity.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from vita_jax.models.projector import pixel_shuffle
from vita_jax.models.vlm import LongVITA, merge_visual_features
from vita_jax.parallel.mesh import make_mesh
from vita_jax.parallel.sharding import shard_state
from vita_jax.spec import model as spec_model


def small_config(**overrides):
  cfg = base.model_config("tiny")
  cfg.vision = spec_model.vision_config(28, 7, hidden=16, layers=2, heads=2, mlp=32)
  cfg.llm = spec_model.llm_config(vocab=97, hidden=24, layers=2, heads=3, kv_heads=1, ffn=40)
  cfg.projector.hidden_size = 24
  cfg.compute_dtype = "float32"
  cfg.remat = "none"
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def inputs(cfg, tiles=(2, 1), seq=16, seed=0):
  """ids with IMG/PATCH/VID context runs (4 tokens per tile) and matching pixels."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(20, cfg.llm.vocab_size, (len(tiles), seq)).astype(np.int32)
  kinds = [cfg.tokens.img_context_id, cfg.tokens.patch_context_id, cfg.tokens.vid_context_id]
  k = 0
  for b, n in enumerate(tiles):
    for t in range(n):
      ids[b, 1 + 5 * t:5 + 5 * t] = kinds[k % 3]
      k += 1
  pix = rng.standard_normal((sum(tiles), 28, 28, 3)).astype(np.float32)
  return ids, pix


def forward_fn(model, **kwargs):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))
  return lambda *a: fn(state, *a)


def test_pixel_shuffle_is_row_col_channel():
  x = np.random.default_rng(0).standard_normal((2, 4, 6, 3)).astype(np.float32)
  out = np.asarray(pixel_shuffle(x, 0.5))
  assert out.shape == (2, 2, 3, 12)
  for i in range(2):
    for j in range(3):
      for r in range(2):
        for s in range(2):
          np.testing.assert_array_equal(out[:, i, j, (r * 2 + s) * 3:(r * 2 + s + 1) * 3],
                                        x[:, 2 * i + r, 2 * j + s])


def test_merge_places_features_in_order_and_ignores_padding_tiles():
  embeds = jnp.zeros((2, 6, 2))
  ids = jnp.array([[1, 9, 9, 1, 8, 1], [8, 1, 1, 9, 1, 1]])
  feats = jnp.arange(1, 13, dtype=jnp.float32).reshape(3, 2, 2)       # 3 tiles x 2 tokens
  want = np.zeros((2, 6, 2))
  for n, (b, s) in enumerate([(0, 1), (0, 2), (0, 4), (1, 0), (1, 3)]):
    want[b, s] = np.asarray(feats).reshape(-1, 2)[n]
  with pytest.raises(ValueError, match="5 visual context tokens .* 3 tiles x 2 tokens"):
    merge_visual_features(embeds, ids, feats, (8, 9), check=True)
  jitted = jax.jit(lambda e, i, f: merge_visual_features(e, i, f, (8, 9), check=False))
  np.testing.assert_array_equal(jitted(embeds, ids, feats), want)
  exact = merge_visual_features(embeds[:1], ids[:1], feats[:1].reshape(1, 2, 2)[:, :2], (8, 9),
                                check=False)
  assert exact.shape == (1, 6, 2)


def test_count_mismatch_is_a_clear_error():
  cfg = small_config()
  model = LongVITA(cfg, rngs=nnx.Rngs(0))
  ids, pix = inputs(cfg)
  with pytest.raises(ValueError, match="12 visual context tokens .* 2 tiles x 4 tokens"):
    model.embed(jnp.asarray(ids), pix[:2])


def _loss_and_grads(cfg, ids, pix):
  model = LongVITA(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def loss(s):
    logits = nnx.merge(graphdef, s)(ids, pix)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return logits, nnx.to_flat_state(grads)


def test_scan_unrolled_and_remat_agree_in_value_and_gradient():
  ids, pix = inputs(small_config())
  ref_logits, ref_grads = _loss_and_grads(small_config(), ids, pix)
  for scan, remat in ((False, "full"), (True, "dots")):
    logits, grads = _loss_and_grads(small_config(scan_layers=scan, remat=remat), ids, pix)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for (path, g), (_, g_ref) in zip(grads, ref_grads):
      np.testing.assert_allclose(g.get_value(), g_ref.get_value(), atol=1e-6, rtol=1e-4,
                                 err_msg=str(path))
  assert any(np.abs(g.get_value()).max() > 0 for p, g in ref_grads if p[0] == "vision")


def test_packed_segments_equal_separate_runs():
  cfg = small_config()
  model = LongVITA(cfg, rngs=nnx.Rngs(1))
  fwd = forward_fn(model)
  a, pa = inputs(cfg, tiles=(1,), seq=9, seed=1)
  b, pb = inputs(cfg, tiles=(1,), seq=7, seed=2)
  packed = np.concatenate([a, b], 1)
  positions = np.concatenate([np.arange(9), np.arange(7)])[None].astype(np.int32)
  segments = np.array([[1] * 9 + [2] * 7], np.int32)
  out = fwd(packed, np.concatenate([pa, pb]), positions, segments)
  np.testing.assert_allclose(out[:, :9], forward_fn(model)(a, pa), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[:, 9:], forward_fn(model)(b, pb), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_states_times_head_weight_are_the_logits(tie):
  cfg = small_config()
  cfg.llm.tie_embeddings = tie
  model = LongVITA(cfg, rngs=nnx.Rngs(2))
  ids, pix = inputs(cfg)
  hidden = forward_fn(model, return_hidden=True)(ids, pix)
  assert hidden.shape == (2, 16, 24)
  w = model.lm_head_weight()
  assert w.shape == (24, 97)
  if tie:
    np.testing.assert_array_equal(w, model.llm.embedding[...].T)
  np.testing.assert_allclose(jnp.einsum("bsd,dv->bsv", hidden, w),
                             forward_fn(model)(ids, pix), atol=1e-5)


def test_every_param_has_logical_axes_and_sharded_forward_matches():
  cfg = small_config()
  mesh = make_mesh({"data": 2, "fsdp": 2, "seq": 1, "tensor": 2})
  plain = LongVITA(cfg, rngs=nnx.Rngs(3))
  for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path
  assert {p[0] for p, _ in nnx.to_flat_state(nnx.state(plain))} == {"vision", "projector", "llm"}
  ids, pix = inputs(cfg, tiles=(2, 2), seq=24)
  ref = forward_fn(plain)(ids, pix)
  sharded = LongVITA(cfg, rngs=nnx.Rngs(3), mesh=mesh)
  graphdef, state = nnx.split(sharded)
  state = shard_state(state, mesh)
  out = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))(state, ids, pix)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_compute_is_close_to_fp32():
  ids, pix = inputs(small_config())
  ref = forward_fn(LongVITA(small_config(), rngs=nnx.Rngs(4)))(ids, pix)
  out = forward_fn(LongVITA(small_config(compute_dtype="bfloat16"), rngs=nnx.Rngs(4)))(ids, pix)
  assert out.dtype == jnp.float32
  rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert rel <= 2e-2, rel


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_swiglu_grads_match_autodiff(dtype, tol):
  """The hand-written SwiGLU backward equals autodiff of silu(gate) * up (extreme gates too)."""
  from vita_jax.models.common import swiglu
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  gate = (jax.random.normal(k1, (3, 5, 16)) * 4).at[0, 0, :3].set(jnp.array([-90.0, 0.0, 90.0]))
  up, dy = jax.random.normal(k2, (3, 5, 16)), jax.random.normal(k3, (3, 5, 16))
  gate, up, dy = (x.astype(dtype) for x in (gate, up, dy))
  ref = lambda g, u: jax.nn.silu(g) * u
  got_y, got_vjp = jax.vjp(swiglu, gate, up)
  want_y, want_vjp = jax.vjp(ref, gate, up)
  np.testing.assert_allclose(np.float32(got_y), np.float32(want_y), rtol=tol, atol=tol)
  for got, want in zip(got_vjp(dy), want_vjp(dy)):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_swiglu_mlp_grads_match_autodiff(dtype, tol):
  """The MLP's hand-written backward equals autodiff of the plain einsums, weights included."""
  from vita_jax.models.common import swiglu_mlp
  ks = jax.random.split(jax.random.key(1), 5)
  h = jax.random.normal(ks[0], (2, 7, 12)).astype(dtype)
  kernels = [(jax.random.normal(k, shape) * 0.3).astype(dtype)
             for k, shape in zip(ks[1:4], [(12, 20), (12, 20), (20, 12)])]
  d_out = jax.random.normal(ks[4], (2, 7, 12)).astype(dtype)

  def ref(h, wg, wu, wd):
    return jnp.einsum("bsf,fd->bsd", jax.nn.silu(h @ wg) * (h @ wu), wd)

  got_y, got_vjp = jax.vjp(swiglu_mlp, h, *kernels)
  want_y, want_vjp = jax.vjp(ref, h, *kernels)
  scale = lambda x: float(np.max(np.abs(np.float32(x)))) + 1e-6
  assert float(np.max(np.abs(np.float32(got_y) - np.float32(want_y)))) <= tol * scale(want_y)
  for got, want in zip(got_vjp(d_out), want_vjp(d_out)):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert float(np.max(np.abs(np.float32(got) - np.float32(want)))) <= tol * scale(want)
