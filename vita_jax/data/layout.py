"""The zigzag token layout as plain numpy, shared by vita_jax and vita_torch (no JAX import).

The (padded) sequence is cut into 2N chunks and shard r holds chunks r and 2N-1-r, pairing an
early chunk with a late one so causal attention costs every shard the same. See
vita_jax.parallel.zigzag for applying it to batches and arrays.
"""

from __future__ import annotations

import numpy as np


def check_divisible(seq_len: int, num_shards: int) -> None:
  """Raise a ValueError naming the nearest usable length if `seq_len` cannot be zigzagged."""
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be a positive integer")
  chunks = 2 * num_shards
  if seq_len % chunks:
    fixed = -(-seq_len // chunks) * chunks
    raise ValueError(f"seq_len {seq_len} is not divisible by 2*num_shards={chunks}; use "
                     f"{fixed} (pad the sequence) or change the number of sequence shards")


def zigzag_permutation(seq_len: int, num_shards: int) -> np.ndarray:
  """int64 [seq_len]: `x_zigzag = x[..., perm]`; shard r holds chunks r and 2N-1-r of 2N."""
  check_divisible(seq_len, num_shards)
  chunk = seq_len // (2 * num_shards)
  chunks = np.arange(seq_len).reshape(2 * num_shards, chunk)
  order = [c for r in range(num_shards) for c in (r, 2 * num_shards - 1 - r)]
  return chunks[order].reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
  """The permutation that undoes `perm`: `x[perm][inverse] == x`."""
  perm = np.asarray(perm)
  inverse = np.empty_like(perm)
  inverse[perm] = np.arange(perm.size, dtype=perm.dtype)
  return inverse
