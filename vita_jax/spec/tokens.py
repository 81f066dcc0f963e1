"""Special tokens, their ids, and where the visual features go (numpy only).

Images and video frames enter the LLM as runs of context tokens (`<IMG_CONTEXT>`,
`<PATCH_CONTEXT>`, `<VID_CONTEXT>`) whose embeddings are replaced by the projector's features,
one run of `tokens_per_tile` tokens per tile or frame, in order over batch then sequence. The
index of the feature row each context token takes is fixed before any reordering (zigzag,
per-process rows) and travels with the tokens, so any layout gets the right features.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from vita_jax.errors import InputError

# Added to the Qwen2.5 tokenizer in this order by the release (docs/design.md#tokens).
VISUAL_SPECIAL_TOKENS = (
    "<img>", "</img>", "<IMG_CONTEXT>",
    "<vid>", "</vid>", "<VID_CONTEXT>",
    "<patch>", "</patch>", "<PATCH_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
    "<image>", "<video>",
)
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Tokens whose embeddings are replaced by visual features, in this order of preference.
CONTEXT_TOKENS = ("<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>")

# Qwen2.5: 151643 byte-level BPE ids, then 22 added specials (151643..151664); the visual
# tokens follow in VISUAL_SPECIAL_TOKENS order.
QWEN_FIRST_VISUAL_ID = 151665
QWEN_EOS_ID, QWEN_PAD_ID = 151645, 151643
# The demo tokenizer (vita_jax.data.demo) puts the ChatML tokens first, then the visual tokens.
DEMO_FIRST_VISUAL_ID = len(CHATML_TOKENS)


def special_token_ids(first_visual_id: int, eos_id: int, pad_id: int) -> ml_collections.ConfigDict:
  """`config.model.tokens` for a tokenizer whose visual tokens start at `first_visual_id`."""
  ids = {tok: first_visual_id + i for i, tok in enumerate(VISUAL_SPECIAL_TOKENS)}
  return ml_collections.ConfigDict(dict(
      eos_id=eos_id,
      pad_id=pad_id,
      img_start_id=ids["<img>"], img_end_id=ids["</img>"], img_context_id=ids["<IMG_CONTEXT>"],
      vid_start_id=ids["<vid>"], vid_end_id=ids["</vid>"], vid_context_id=ids["<VID_CONTEXT>"],
      patch_start_id=ids["<patch>"], patch_end_id=ids["</patch>"],
      patch_context_id=ids["<PATCH_CONTEXT>"],
      # The `internvl` layout marks every image token with one id (transformers'
      # image_token_id); -1 = none. It is replaced by visual features like the context tokens.
      image_token_id=-1,
  ))


def context_token_ids(tokens: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Ids whose embeddings are replaced by visual features (negative ids are disabled)."""
  ids = (tokens.img_context_id, tokens.patch_context_id, tokens.vid_context_id,
         tokens.get("image_token_id", -1))
  return tuple(sorted({int(i) for i in ids if int(i) >= 0}))


def tokens_per_tile(model: ml_collections.ConfigDict, tile_side: int | None = None) -> int:
  """Visual tokens per tile or frame: the patch grid after pixel shuffle. `tile_side` (default:
  the config's image_size) lets pixels of another size be counted, since the vision tower
  resizes its position table to them."""
  side = (tile_side or model.vision.image_size) // model.vision.patch_size
  return int(side * model.downsample_ratio) ** 2


def context_index(ids, context_ids) -> np.ndarray:
  """int32 [B, S]: row of the flattened visual features [T * tokens_per_tile, D] that each
  context token takes (a running count over batch then sequence), -1 at other tokens."""
  is_ctx = np.isin(np.asarray(ids), np.asarray(context_ids))
  index = np.cumsum(is_ctx.reshape(-1)).reshape(is_ctx.shape) - 1
  return np.where(is_ctx, index, -1).astype(np.int32)


def check_visual_tokens(ids, context_ids, num_tiles: int, tokens_per_tile: int) -> None:
  """Raise an InputError unless `ids` hold exactly num_tiles * tokens_per_tile context tokens."""
  found = int(np.isin(np.asarray(ids), np.asarray(context_ids)).sum())
  expected = num_tiles * tokens_per_tile
  if found != expected:
    raise InputError(
        f"the input has {found} visual context tokens but pixel_values gives {num_tiles} tiles x "
        f"{tokens_per_tile} tokens per tile = {expected} features; every tile/frame needs "
        "exactly one run of context tokens (build the prompt with vita_jax.data.prompt)")
