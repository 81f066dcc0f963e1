"""Long-VITA: InternViT on every tile/frame -> pixel shuffle + projector -> features placed, in
order, at the visual context tokens of a Qwen2 decoder (docs/design.md#model). The call is the
one docs/design.md#contracts fixes.

    model = LongVITA(base.model_config("tiny"), rngs=nnx.Rngs(0))
    logits = model(input_ids, pixel_values)          # fp32 [B, S, V]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vita_jax.models.common import exact_in_fp32
from vita_jax.models.llm import Qwen2
from vita_jax.models.projector import Projector
from vita_jax.models.vision import InternViT
from vita_jax.spec.tokens import check_visual_tokens, context_token_ids, tokens_per_tile

__all__ = ["LongVITA", "context_token_ids", "merge_visual_features"]


def merge_visual_features(embeds, input_ids, features, context_ids, *, check: bool,
                          context_index=None):
  """Put features [T, n, D] into embeds [B, S, D] at the context tokens, in order (batch
  first, then sequence). Features beyond the number of context tokens (padding tiles under a
  static tile budget) are ignored. With `check`, counts must match exactly.

  `context_index` int [B, S] (row of the flattened features per context token, -1 elsewhere)
  overrides the in-order rule: it is computed before the tokens are reordered (zigzag) or
  split across processes, and travels with them, so any token layout gets the right features.
  """
  is_ctx = jnp.isin(input_ids, jnp.asarray(context_ids, input_ids.dtype))     # [B, S]
  flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
  if check:
    check_visual_tokens(input_ids, context_ids, features.shape[0], features.shape[1])
  if context_index is not None:
    index = jnp.asarray(context_index, jnp.int32).reshape(-1)
    is_ctx = is_ctx & (jnp.asarray(context_index) >= 0)
  else:
    index = jnp.cumsum(is_ctx.reshape(-1)) - 1
  gathered = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0)
  gathered = gathered.reshape(embeds.shape)
  return jnp.where(is_ctx[..., None], gathered, embeds)


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


class LongVITA(nnx.Module):
  """The vision-language model. Submodules: `vision`, `projector`, `llm`."""

  def __init__(self, model_cfg, *, rngs: nnx.Rngs, mesh=None):
    self.config = model_cfg
    self.mesh = mesh
    common = dict(param_dtype=model_cfg.param_dtype, compute_dtype=model_cfg.compute_dtype)
    self.compute_dtype = jnp.dtype(model_cfg.compute_dtype)
    layers = dict(remat=model_cfg.remat, scan_layers=model_cfg.scan_layers,
                  attention_cfg=dict(model_cfg.attention))
    self.vision = InternViT(model_cfg.vision, rngs=rngs, **common, **layers)
    self.projector = Projector(model_cfg.vision.hidden_size, model_cfg.llm.hidden_size,
                               model_cfg.projector, model_cfg.downsample_ratio, rngs=rngs,
                               **common)
    self.llm = Qwen2(model_cfg.llm, rngs=rngs, **common, **layers)
    self.context_ids = context_token_ids(model_cfg.tokens)

  @exact_in_fp32
  def image_features(self, pixel_values):
    """pixel_values [T, H, W, 3] -> LLM-space features [T, tokens_per_tile, D]."""
    return self.projector(self.vision(jnp.asarray(pixel_values, jnp.float32), mesh=self.mesh))

  def embed(self, input_ids, pixel_values=None, context_index=None):
    """Token embeddings with visual features placed at the context tokens. [B, S, D]."""
    x = self.llm.embed(input_ids)
    if pixel_values is not None and pixel_values.shape[0] > 0:
      concrete = not _is_traced(input_ids)
      if concrete:    # fail before running the vision tower
        self._check_counts(input_ids, pixel_values.shape)
      features = self.image_features(pixel_values)
      x = merge_visual_features(x, input_ids, features, self.context_ids, check=concrete,
                                context_index=context_index)
    return x

  def _check_counts(self, input_ids, pixel_shape):
    check_visual_tokens(input_ids, self.context_ids, pixel_shape[0],
                        tokens_per_tile(self.config, tile_side=pixel_shape[1]))

  @exact_in_fp32
  def __call__(self, input_ids, pixel_values=None, positions=None, segment_ids=None, *,
               context_index=None, return_hidden: bool = False):
    """input_ids int [B, S] -> fp32 logits [B, S, V] (or final hidden states [B, S, D]).

    `context_index` (optional, int [B, S]) says which feature row each visual context token
    takes; without it they are taken in order (see merge_visual_features)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, s = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    x = self.embed(input_ids, pixel_values, context_index)
    hidden = self.llm(x, jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32),
                      mesh=self.mesh)
    if return_hidden:
      return hidden
    return self.llm.logits(hidden)

  def lm_head_weight(self):
    """[D, V] LM head kernel (the embedding transposed when embeddings are tied)."""
    return self.llm.lm_head_weight()
