"""A one-turn chat prompt with images and videos -> token ids and pixels (numpy only).

Both generation CLIs (vita_jax.generate, vita_torch.generate) build their prompt here, so the
same command gives the same token ids in either framework. The layout is
vita_jax.data.conversation's: videos first, then images, each block followed by "\\n", then the
question; the prompt ends with `<|im_start|>assistant\\n`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vita_jax.data import image as image_lib
from vita_jax.data import video as video_lib
from vita_jax.data.conversation import encode_conversation
from vita_jax.spec.tokens import tokens_per_tile


def encode_prompt(cfg, tok, prompt: str, images=(), videos=(), max_frames: int = 64,
                  frames=None):
  """-> (ids int32 [1, S], pixel_values float32 [tiles, H, W, 3] or None), pixels in the order
  of their token blocks. `cfg` is the model config (vision.image_size, max_tiles, tokens);
  `images` / `videos` are file paths; `frames` (uint8 [N, h, w, 3]) is one more video, in
  memory, after the `videos`."""
  tile = cfg.vision.image_size
  pictures = [image_lib.load_image(p) for p in images]
  clips = [video_lib.load_video(v, tile, max_frames) for v in videos]
  if frames is not None:
    clips.append(image_lib.normalize(np.stack(
        [image_lib.resize_square(Image.fromarray(f), tile) for f in frames])))
  return encode_messages(cfg, tok, [{"role": "user", "content": prompt}], pictures, clips)


def encode_messages(cfg, tok, messages: list[dict], pictures=(), clips=()):
  """A conversation ending with `<|im_start|>assistant\n` -> (ids int32 [1, S], pixel_values
  or None). `pictures` are PIL images and `clips` normalised frames [n, tile, tile, 3], given in
  memory (the server decodes uploads itself); `<image>` / `<video>` in the messages place them,
  as in vita_jax.data.conversation. Raises SampleError on a placeholder/media count mismatch."""
  tile, max_tiles = cfg.vision.image_size, cfg.max_tiles
  grids = [image_lib.grid_of(p.size, tile, max_tiles) for p in pictures]
  enc = encode_conversation(messages, tok, tokens_per_tile(cfg), grids, [len(c) for c in clips])
  ids = list(enc.ids) + [tok.ids["<|im_start|>"]] + tok.encode("assistant\n")
  pixels = [image_lib.dynamic_tiles(pictures[i], tile, max_tiles) if kind == "image"
            else clips[i] for kind, i in enc.visual_order]
  pixels = np.concatenate(pixels).astype(np.float32) if pixels else None
  return np.asarray([ids], np.int32), pixels
