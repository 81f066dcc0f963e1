"""Tiny random checkpoints and inputs for the parity tests and `vita_jax.verify`.

`make_internvl_checkpoint` builds transformers' InternVLForConditionalGeneration with tiny
shapes and random (not default-initialised: no zero biases or unit norms) fp32 weights and saves
it; `to_long_vita` rewrites such a directory in the release layout.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 299      # the tiny vocabulary's last id


def tiny_internvl_config(tie_embeddings: bool = False):
  from transformers import InternVLConfig
  return InternVLConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, image_size=56, patch_size=14,
                         attention_bias=True, layer_norm_eps=1e-6),
      text_config=dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=tie_embeddings,
                       max_position_embeddings=4096),
      image_token_id=IMAGE_TOKEN_ID, image_seq_length=4, downsample_ratio=0.5,
      tie_word_embeddings=tie_embeddings)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> None:
  """Every parameter random: norms near 1, layer scales near 0.1, everything else N(0, std)."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    noise = torch.randn(p.shape, generator=gen)
    if "norm" in name and name.endswith("weight"):
      p.copy_(1.0 + 0.1 * noise)
    elif "lambda" in name or name.endswith(("ls1", "ls2")):
      p.copy_(0.1 + 0.02 * noise)
    else:
      p.copy_(std * noise)


def make_internvl_checkpoint(path: str, seed: int = 0, tie_embeddings: bool = False):
  """Save a tiny random InternVL (internvl layout) to `path`; returns the fp32 HF model."""
  from transformers import InternVLForConditionalGeneration
  torch.manual_seed(seed)
  model = InternVLForConditionalGeneration(tiny_internvl_config(tie_embeddings)).eval()
  randomize_(model, seed)
  model.save_pretrained(path)
  return model


def to_long_vita(internvl_dir: str, out_dir: str) -> None:
  """Rewrite an internvl-layout directory in the long_vita layout (same weights)."""
  from vita_torch.io import read_checkpoint, save_long_vita
  cfg, state = read_checkpoint(internvl_dir)
  cfg.layout = "long_vita"
  save_long_vita(cfg, state, out_dir)


def sample_inputs(batch: int, seq: int, tiles: int, *, tokens_per_tile: int = 4, vocab: int = 300,
                  image_token_id: int = IMAGE_TOKEN_ID, image_size: int = 56, seed: int = 0):
  """(input_ids [B, S] int64, pixel_values [tiles, 3, H, W] or None): random text with
  `tiles * tokens_per_tile` image tokens spread over the batch, none in the first two slots."""
  gen = torch.Generator().manual_seed(seed)
  ids = torch.randint(0, image_token_id, (batch, seq), generator=gen)
  if not tiles:
    return ids, None
  need = tiles * tokens_per_tile
  per_row = [need // batch + (r < need % batch) for r in range(batch)]
  for r, n in enumerate(per_row):
    start = int(torch.randint(2, seq - n - 1, (1,), generator=gen)) if seq - n - 1 > 2 else 1
    ids[r, start:start + n] = image_token_id
  pixels = torch.randn(tiles, 3, image_size, image_size, generator=gen)
  return ids, pixels
