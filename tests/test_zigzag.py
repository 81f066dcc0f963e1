"""The zigzag layout: chunk assignment, inverse, whole-batch application, clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.errors import ConfigError
from vita_jax.spec.zigzag import (
  inverse_permutation,
  unzigzag,
  zigzag,
  zigzag_batch,
  zigzag_permutation,
)


def test_rank_r_holds_chunks_r_and_2n_minus_1_minus_r():
  perm = zigzag_permutation(16, 4)  # 8 chunks of 2
  shards = perm.reshape(4, 4)
  for r in range(4):
    chunks = sorted(set(shards[r] // 2))
    assert chunks == [r, 7 - r]
  assert sorted(perm) == list(range(16))


@pytest.mark.parametrize("seq_len, shards", [(8, 1), (64, 4), (1024, 8)])
def test_zigzag_then_inverse_is_identity(seq_len, shards):
  perm = zigzag_permutation(seq_len, shards)
  inverse = inverse_permutation(perm)
  x = np.arange(seq_len) * 3 + 1
  np.testing.assert_array_equal(x[perm][inverse], x)
  np.testing.assert_array_equal(x[inverse][perm], x)
  y = jnp.asarray(np.random.default_rng(0).normal(size=(2, seq_len, 3)))
  np.testing.assert_array_equal(unzigzag(zigzag(y, shards), shards), y)


def test_causal_work_is_balanced():
  """Each shard's number of (query, key<=query) pairs is the same in the zigzag layout."""
  seq_len, shards = 64, 4
  work = [sum(q + 1 for q in rows) for rows in zigzag_permutation(seq_len, shards)
          .reshape(shards, -1)]
  assert len(set(work)) == 1


def test_zigzag_batch_permutes_token_entries_only():
  b, s = 2, 16
  batch = {
      "input_ids": np.arange(b * s).reshape(b, s),
      "labels": jnp.arange(b * s).reshape(b, s) + 100,
      "positions": np.tile(np.arange(s), (b, 1)),
      "segment_ids": np.ones((b, s), np.int32),
      "embeddings": np.random.default_rng(0).normal(size=(b, s, 4)),
      "pixel_values": np.zeros((2, 16, 16, 3)),  # [tiles, H, W, 3]: leading dims match by chance
      "num_tiles": np.array([1, 1]),
  }
  out = zigzag_batch(batch, 2)
  perm = zigzag_permutation(s, 2)
  for key in ("input_ids", "positions", "segment_ids", "embeddings"):
    np.testing.assert_array_equal(out[key], batch[key][:, perm])
  np.testing.assert_array_equal(out["labels"], np.asarray(batch["labels"])[:, perm])
  assert out["pixel_values"] is batch["pixel_values"]
  assert out["num_tiles"] is batch["num_tiles"]
  np.testing.assert_array_equal(unzigzag(out["embeddings"], 2), batch["embeddings"])


def test_indivisible_length_names_the_fix():
  with pytest.raises(ConfigError, match=r"seq_len 1000 is not divisible by 2\*num_shards=16; "
                     r"use 1008"):
    zigzag_permutation(1000, 8)
  assert issubclass(ConfigError, ValueError)
