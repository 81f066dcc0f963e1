"""Where the visual features go: the context-token index and its count check (numpy only).

Every tile/frame's features [tokens_per_tile, D] replace one run of visual context tokens, in
order over batch then sequence (DESIGN §2). The index is fixed before any reordering (zigzag,
per-process rows) and travels with the tokens, so any layout gets the right features. Both
frameworks (vita_jax and vita_torch) use these two functions.
"""

from __future__ import annotations

import numpy as np


def context_index(ids, context_ids) -> np.ndarray:
  """int32 [B, S]: row of the flattened visual features [T * tokens_per_tile, D] that each
  context token takes (a running count over batch then sequence), -1 at other tokens."""
  is_ctx = np.isin(np.asarray(ids), np.asarray(context_ids))
  index = np.cumsum(is_ctx.reshape(-1)).reshape(is_ctx.shape) - 1
  return np.where(is_ctx, index, -1).astype(np.int32)


def check_visual_tokens(ids, context_ids, num_tiles: int, tokens_per_tile: int) -> None:
  """Raise a ValueError unless `ids` hold exactly num_tiles * tokens_per_tile context tokens."""
  found = int(np.isin(np.asarray(ids), np.asarray(context_ids)).sum())
  expected = num_tiles * tokens_per_tile
  if found != expected:
    raise ValueError(
        f"the input has {found} visual context tokens but pixel_values gives {num_tiles} tiles x "
        f"{tokens_per_tile} tokens per tile = {expected} features; every tile/frame needs "
        "exactly one run of context tokens (build the prompt with vita_jax.data.conversation)")
