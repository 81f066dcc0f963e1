"""The zigzag (load-balanced) sequence layout for causal ring attention; numpy only, shared by
vita_jax and vita_torch.

With a contiguous split of a causal sequence over N shards, shard 0 sees almost nothing and
shard N-1 sees everything. Cutting the (padded) sequence into 2N chunks and giving shard r the
chunks r and 2N-1-r pairs an early chunk with a late one, so every shard does the same work.

The layout is applied once to the whole batch (tokens, labels, positions, segment ids) before it
is sharded; because attention masks come from the positions and segment ids that travel with the
tokens, the model and the loss never need to know the layout. `unzigzag` restores the original
order of outputs such as logits. The functions take numpy or JAX arrays (`.take` on either).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from vita_jax.errors import ConfigError

# Entries that are not [batch, seq, ...] even when their leading dims happen to match.
NOT_TOKEN_ALIGNED = ("pixel_values",)


def check_divisible(seq_len: int, num_shards: int) -> None:
  """Raise a ConfigError naming the nearest usable length if `seq_len` cannot be zigzagged."""
  if num_shards < 1:
    raise ConfigError(f"num_shards={num_shards} must be a positive integer")
  chunks = 2 * num_shards
  if seq_len % chunks:
    fixed = -(-seq_len // chunks) * chunks
    raise ConfigError(f"seq_len {seq_len} is not divisible by 2*num_shards={chunks}; use "
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


def _take(x, index: np.ndarray, axis: int):
  return (x if hasattr(x, "take") else np.asarray(x)).take(index, axis=axis)


def _batch_dims(batch: Mapping[str, object], exclude: Iterable[str]) -> tuple[int, int]:
  """(batch, seq) from `input_ids` if present, else from the first 2-D+ token entry."""
  if "input_ids" in batch:
    return tuple(np.shape(batch["input_ids"])[:2])
  for key, value in batch.items():
    if key not in exclude and np.ndim(value) >= 2:
      return tuple(np.shape(value)[:2])
  raise ValueError(f"zigzag_batch found no [batch, seq] entry among {sorted(batch)}; pass "
                   "at least input_ids")


def zigzag_batch(batch: Mapping[str, object], num_shards: int,
                 exclude: Iterable[str] = NOT_TOKEN_ALIGNED) -> dict:
  """Permute axis 1 of every [B, S, ...] entry of `batch` into the zigzag layout.

  B and S come from `input_ids` (or the first 2-D entry). Entries of another shape, and those
  named in `exclude` (e.g. pixel_values [tiles, H, W, 3]), are returned untouched.
  """
  exclude = tuple(exclude)
  b, s = _batch_dims(batch, exclude)
  perm = zigzag_permutation(s, num_shards)
  out = {}
  for key, value in batch.items():
    aligned = key not in exclude and np.ndim(value) >= 2 and tuple(np.shape(value)[:2]) == (b, s)
    out[key] = _take(value, perm, axis=1) if aligned else value
  return out


def zigzag(x, num_shards: int, axis: int = 1):
  """One array into the zigzag layout along `axis`."""
  return _take(x, zigzag_permutation(x.shape[axis], num_shards), axis)


def unzigzag(x, num_shards: int, axis: int = 1):
  """Back from the zigzag layout to the original token order along `axis` (e.g. logits)."""
  perm = zigzag_permutation(x.shape[axis], num_shards)
  return _take(x, inverse_permutation(perm), axis)
