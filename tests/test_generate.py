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


_forward = nnx.jit(lambda m, x, p: m(x, p))


def _naive_greedy(model, ids, pixels, n, width=None):
  """(tokens [B, n], logits at the last prompt token [B, V]): the full model rerun on the whole
  sequence for every token (one fixed padded shape, `width` >= S + n if given; causal, so the
  padding is never seen)."""
  b, s = ids.shape
  cur = np.zeros((b, width or s + n), np.int32)
  cur[:, :s] = ids
  first = None
  for i in range(n):
    logits = np.asarray(_forward(model, cur, pixels)[:, s + i - 1])
    first = logits if first is None else first
    cur[:, s + i] = logits.argmax(-1)
  return cur[:, s:s + n], first


@pytest.fixture(scope="module")
def reference(model):
  ids, pixels = _prompt(model)
  tokens, logits = _naive_greedy(model, ids, pixels, NEW)
  return ids, pixels, tokens, logits


@pytest.mark.parametrize("shards", [1, 2, 4, 8])
def test_seq_shards_match_naive_greedy(model, reference, shards):
  ids, pixels, want_tokens, want_logits = reference
  logits, cache, lengths = gen.prefill(model, ids, pixels, seq_shards=shards,
                                       max_new_tokens=NEW, vision_chunk=2)
  assert lengths.tolist() == [ids.shape[1]] and cache.k.shape[2] % (2 * shards) == 0
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


# Ragged batches: rows of different lengths in one call, padding carried by segment id 0.

RAGGED = (5, 17, 11)


def _ragged_rows(model):
  """Rows of 5, 17 and 11 tokens: text only; 11 words and an image of 1 tile; a video of 1
  frame and 5 words -> (rows, pixels of rows 1 and 2 in order, each row's own pixels)."""
  t = model.config.tokens
  rng = np.random.default_rng(7)
  words = lambda n: [int(w) for w in rng.integers(30, 2000, size=n)]
  tpt = spec_tokens.tokens_per_tile(model.config)
  rows = [words(5),
          words(6) + [t.img_start_id] + [t.img_context_id] * tpt + [t.img_end_id] + words(5),
          [t.vid_start_id] + [t.vid_context_id] * tpt + [t.vid_end_id] + words(5)]
  assert tuple(map(len, rows)) == RAGGED
  pixels = rng.normal(size=(2, 56, 56, 3)).astype(np.float32)
  return rows, pixels, [None, pixels[:1], pixels[1:]]


@pytest.fixture(scope="module")
def sharp(model):
  """The tiny model with its query and key kernels x4. At initialisation attention is nearly
  uniform, so greedy tokens hardly depend on positions: decoding every row from the longest
  row's length gave the same tokens. Sharper attention makes such a mistake change them."""
  sharp = LongVITA(model.config, rngs=nnx.Rngs(0))
  layers = sharp.llm.layers
  layers.q_kernel[...] = layers.q_kernel[...] * 4
  layers.k_kernel[...] = layers.k_kernel[...] * 4
  return sharp


@pytest.fixture(scope="module")
def ragged(sharp):
  """The ragged rows and, per row run alone through the naive loop, its greedy tokens [NEW] and
  last-prompt-token logits [V] (the `sharp` model)."""
  rows, pixels, own = _ragged_rows(sharp)
  tokens, logits = zip(*(_naive_greedy(sharp, np.asarray([r], np.int32), p, NEW, width=32)
                         for r, p in zip(rows, own)))
  return rows, pixels, own, np.concatenate(tokens), np.concatenate(logits)


@pytest.mark.parametrize("shards", [1, 4])
def test_ragged_batch_matches_naive_rows_alone(sharp, ragged, shards):
  """Rows of 5, 17 and 11 tokens (two with visual tokens) in one batch: each row's
  last-position logits (<= 1e-4) and greedy tokens equal the naive loop on that row alone."""
  rows, pixels, _, want_tokens, want_logits = ragged
  logits, cache, lengths = gen.prefill(sharp, rows, pixels, seq_shards=shards,
                                       max_new_tokens=NEW)
  assert lengths.tolist() == list(RAGGED) and cache.k.shape[2] == 32
  np.testing.assert_array_equal(np.asarray(cache.segment_ids).sum(1), RAGGED)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=0)
  got = gen.generate(sharp, rows, pixels, max_new_tokens=NEW, seq_shards=shards)
  np.testing.assert_array_equal(got, want_tokens)


@pytest.mark.slow
def test_ragged_batch_equals_generate_on_each_row(sharp, ragged):
  """The batch's tokens equal `generate` on each row alone (one compile per row's bucket)."""
  rows, pixels, own, _, _ = ragged
  got = gen.generate(sharp, rows, pixels, max_new_tokens=NEW)
  alone = [gen.generate(sharp, [r], p, max_new_tokens=NEW) for r, p in zip(rows, own)]
  np.testing.assert_array_equal(np.concatenate(alone), got)


@pytest.mark.slow
def test_ragged_batch_with_sharded_parameters(sharp, ragged):
  """Seq 2 x fsdp 2 x tensor 2: the same logits and tokens as the naive loop, row by row."""
  rows, pixels, _, want_tokens, want_logits = ragged
  kw = dict(seq_shards=2, fsdp=2, tensor=2, max_new_tokens=NEW)
  logits, _, _ = gen.prefill(sharp, rows, pixels, **kw)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(gen.generate(sharp, rows, pixels, **kw), want_tokens)


def test_ragged_eos_in_one_row_while_others_continue(sharp, ragged):
  """Row 1 produces EOS at its third token and is padded after it; the other rows go on (the
  streaming path, one jitted step per token)."""
  rows, pixels, _, want, _ = ragged
  eos = int(want[1, 2])
  pad = int(sharp.config.tokens.get("pad_id", 0))
  expect = want.copy()
  for r in range(len(rows)):
    hits = np.flatnonzero(want[r] == eos)
    if hits.size:
      expect[r, hits[0] + 1:] = pad
  ends = [np.flatnonzero(want[r] == eos) for r in range(len(rows))]
  assert any(e.size == 0 or e[0] > 2 for e in ends), "no row continues past row 1's EOS"
  count = max(NEW if e.size == 0 else e[0] + 1 for e in ends)
  streamed = []
  got = gen.generate(sharp, rows, pixels, max_new_tokens=NEW, eos_id=eos,
                     on_token=lambda i, tok: streamed.append(tok.tolist()))
  np.testing.assert_array_equal(got, expect[:, :count])
  np.testing.assert_array_equal(np.asarray(streamed).T, got)


def test_ragged_input_errors(model):
  with pytest.raises(gen.InputError, match="row 1 of input_ids is empty"):
    gen.generate(model, [[40, 41], [], [42]], max_new_tokens=2)
  with pytest.raises(gen.InputError, match="empty list"):
    gen.prefill(model, [])
  with pytest.raises(gen.InputError, match=r"row 0 of input_ids must be a 1-D.*ids\[0\]"):
    gen.prefill(model, [np.ones((1, 4), np.int32)])
  with pytest.raises(gen.InputError, match=r"longest row of the prompt \(1\) has 99 tokens"):
    gen.prefill(model, [[40] * 3, [40] * 99], max_new_tokens=2, max_length=100)
