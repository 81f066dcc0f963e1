"""generate(): context-parallel prefill + sharded-cache decode against a naive loop that reruns
the full model (dense attention, no cache) for every new token."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from vita_jax import generate as gen
from vita_jax.models.vlm import LongVITA
from vita_jax.spec import tokens as spec_tokens

NEW = 8


@pytest.fixture(scope="module")
def model():
  cfg = base.model_config("tiny")
  cfg.compute_dtype = "float32"
  cfg.remat = "none"
  cfg.llm.max_position_embeddings = 128
  return LongVITA(cfg, rngs=nnx.Rngs(0))


def _prompt(model, seed=0, text=21, tiles=3):
  """ids [1, S] with one image (1 tile) and a video of tiles-1 frames; pixels [tiles, 56, 56, 3]."""
  t = model.config.tokens
  rng = np.random.default_rng(seed)
  words = lambda n: list(rng.integers(30, 2000, size=n))
  tpt = spec_tokens.tokens_per_tile(model.config)
  ids = words(text // 2) + [t.img_start_id] + [t.img_context_id] * tpt + [t.img_end_id]
  for _ in range(tiles - 1):
    ids += [t.vid_start_id] + [t.vid_context_id] * tpt + [t.vid_end_id]
  ids += words(text - text // 2)
  pixels = rng.normal(size=(tiles, 56, 56, 3)).astype(np.float32)
  return np.asarray([ids], np.int32), pixels


def _naive_greedy(model, ids, pixels, n):
  """(tokens [B, n], logits at the last prompt token [B, V]): the full model rerun on the whole
  sequence for every token (one fixed padded shape; causal, so the padding is never seen)."""
  b, s = ids.shape
  forward = nnx.jit(lambda m, x, p: m(x, p))
  cur = np.zeros((b, s + n), np.int32)
  cur[:, :s] = ids
  first = None
  for i in range(n):
    logits = np.asarray(forward(model, cur, pixels)[:, s + i - 1])
    first = logits if first is None else first
    cur[:, s + i] = logits.argmax(-1)
  return cur[:, s:], first


@pytest.fixture(scope="module")
def reference(model):
  ids, pixels = _prompt(model)
  tokens, logits = _naive_greedy(model, ids, pixels, NEW)
  return ids, pixels, tokens, logits


@pytest.mark.parametrize("shards", [1, 2, 4, 8])
def test_seq_shards_match_naive_greedy(model, reference, shards):
  ids, pixels, want_tokens, want_logits = reference
  logits, cache, s = gen.prefill(model, ids, pixels, seq_shards=shards, max_new_tokens=NEW,
                                 vision_chunk=2)
  assert s == ids.shape[1] and cache.k.shape[2] % (2 * shards) == 0
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=0)
  got = gen.generate(model, ids, pixels, max_new_tokens=NEW, seq_shards=shards, vision_chunk=2)
  np.testing.assert_array_equal(got, want_tokens)


def test_cache_stays_sharded(model, reference):
  ids, pixels, _, _ = reference
  _, cache, _ = gen.prefill(model, ids, pixels, seq_shards=4)
  assert cache.k.sharding.spec[2] == "seq"          # [L, B, S, Hkv, hd] sharded over S
  shard_rows = {s.data.shape[2] for s in cache.k.addressable_shards}
  assert shard_rows == {cache.k.shape[2] // 4}


def test_text_only_batch_and_streaming(model):
  rng = np.random.default_rng(3)
  ids = rng.integers(30, 2000, size=(2, 13)).astype(np.int32)
  want, _ = _naive_greedy(model, ids, None, 5)
  streamed = []
  got = gen.generate(model, ids, max_new_tokens=5, seq_shards=2,
                     on_token=lambda i, tok: streamed.append((i, tok.tolist())))
  np.testing.assert_array_equal(got, want)
  assert [i for i, _ in streamed] == list(range(5))
  np.testing.assert_array_equal(np.asarray([t for _, t in streamed]).T, want)


def test_sampling_is_reproducible(model, reference):
  ids, pixels, greedy, _ = reference
  kw = dict(max_new_tokens=NEW, seq_shards=2, temperature=1.5)
  a = gen.generate(model, ids, pixels, seed=1, **kw)
  b = gen.generate(model, ids, pixels, seed=1, **kw)
  c = gen.generate(model, ids, pixels, seed=2, **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # top_k=1 keeps only the argmax: sampling must reduce to greedy.
  k1 = gen.generate(model, ids, pixels, seed=5, top_k=1, **kw)
  np.testing.assert_array_equal(k1, greedy)


def test_sampler_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = gen.jax.random.split(gen.jax.random.PRNGKey(0), 200)
  draw = lambda s: set(np.asarray(gen.jax.vmap(lambda k: gen.sample(logits, k, s))(keys)).ravel())
  assert draw(gen.Sampling(1.0, 2, 1.0)) == {0, 1}
  assert draw(gen.Sampling(1.0, 0, 0.7)) == {0, 1}       # 0.5 < 0.7 <= 0.8
  assert draw(gen.Sampling(1.0, 0, 0.4)) == {0}
  assert draw(gen.Sampling(1.0, 0, 1.0)) == {0, 1, 2, 3}


def test_eos_stops(model, reference):
  ids, pixels, greedy, _ = reference
  eos = int(greedy[0, 3])
  first = int(np.argmax(greedy[0] == eos))
  got = gen.generate(model, ids, pixels, max_new_tokens=NEW, seq_shards=2, eos_id=eos)
  np.testing.assert_array_equal(got, greedy[:, :first + 1])


def test_prompt_longer_than_maximum_is_an_error(model):
  ids = np.full((1, 125), 40, np.int32)
  with pytest.raises(ValueError, match=r"125 tokens and max_new_tokens=8.*maximum length 128"):
    gen.generate(model, ids, max_new_tokens=8)
  with pytest.raises(ValueError, match="maximum length 100"):
    gen.generate(model, ids[:, :99], max_new_tokens=2, max_length=100)


def test_visual_token_count_mismatch_is_an_error(model, reference):
  ids, pixels, _, _ = reference
  with pytest.raises(ValueError, match="visual context tokens"):
    gen.generate(model, ids, pixels[:2], max_new_tokens=2)


def test_bucket_length():
  assert gen.bucket_length(37, 1) == 64 and gen.bucket_length(37, 8) == 64
  assert gen.bucket_length(16, 8) == 16 and gen.bucket_length(17, 8) == 32
  assert gen.bucket_length(1, 3) == 6 and gen.bucket_length(7, 3) == 12


@pytest.mark.parametrize("seq, fsdp, tensor", [
    (2, 1, 4), pytest.param(4, 2, 1, marks=pytest.mark.slow),
    pytest.param(8, 1, 1, marks=pytest.mark.slow), pytest.param(2, 2, 2, marks=pytest.mark.slow)])
def test_sharded_parameters_match_naive_greedy(model, reference, seq, fsdp, tensor):
  """Parameters split over fsdp and/or tensor besides the sequence over seq: the same greedy
  tokens and last-position logits (fp32, <= 1e-4) as the unsharded naive loop."""
  ids, pixels, want_tokens, want_logits = reference
  kw = dict(seq_shards=seq, fsdp=fsdp, tensor=tensor, vision_chunk=2)
  logits, cache, _ = gen.prefill(model, ids, pixels, max_new_tokens=NEW, **kw)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=0)
  mesh = gen._runner(model, seq, fsdp, tensor).mesh
  assert dict(mesh.shape) == {"data": 1, "fsdp": fsdp, "seq": seq, "tensor": tensor}
  state = gen._runner(model, seq, fsdp, tensor).state(model)
  axes = lambda spec: {a for e in spec for a in (e if isinstance(e, tuple) else (e,))}
  split = [leaf for leaf in gen.jax.tree.leaves(state)
           if axes(leaf.sharding.spec) & {"fsdp", "tensor"}]
  if fsdp * tensor > 1:                 # the weights really are split, not replicated
    assert split and all(s.data.size < leaf.size for leaf in split[:3]
                         for s in leaf.addressable_shards)
  got = gen.generate(model, ids, pixels, max_new_tokens=NEW, **kw)
  np.testing.assert_array_equal(got, want_tokens)


def test_mesh_larger_than_the_devices_is_an_error(model):
  with pytest.raises(gen.ConfigError, match=r"seq_shards=4 x fsdp=2 x tensor=2 needs that many"):
    gen.generate(model, np.ones((1, 8), np.int32), max_new_tokens=2, seq_shards=4, fsdp=2,
                 tensor=2)
