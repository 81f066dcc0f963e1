"""Pixel shuffle + the vision-to-language projector (docs/design.md#model).

Long-VITA: LayerNorm(4*Dv) -> Linear(4*Dv -> Dv, no bias) -> GELU -> Linear(Dv -> D, no bias).
transformers' InternVL: the same with biases and hidden width D. Width and bias are config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vita_jax.models.common import exact_in_fp32, layer_norm, param


def pixel_shuffle(x, ratio: float):
  """x [T, H, W, C] -> [T, H*ratio, W*ratio, C/ratio**2], channels ordered (row, col, c).

  This is `n (h r) (w s) c -> n h w (r s c)`, what InternVL's view/permute sequence computes.
  """
  t, h, w, c = x.shape
  f = round(1 / ratio)
  if h % f or w % f:
    raise ValueError(f"the patch grid {h}x{w} is not divisible by 1/downsample_ratio={f}")
  x = x.reshape(t, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(t, h // f, w // f, f * f * c)


class Projector(nnx.Module):
  """Vision patch features [T, N, Dv] -> LLM embeddings [T, N*ratio**2, D]."""

  def __init__(self, vision_hidden: int, llm_hidden: int, cfg, downsample_ratio: float, *,
               rngs: nnx.Rngs, param_dtype="float32", compute_dtype="float32"):
    self.ratio = downsample_ratio
    self.eps = cfg.layer_norm_eps
    self.compute_dtype = jnp.dtype(compute_dtype)
    d_in = vision_hidden * round(1 / downsample_ratio) ** 2
    hidden = cfg.hidden_size
    self.norm_scale = param(rngs, (d_in,), ("norm",), param_dtype, "ones")
    self.norm_bias = param(rngs, (d_in,), ("norm",), param_dtype, "zeros")
    self.fc1_kernel = param(rngs, (d_in, hidden), ("vision_embed", "mlp"), param_dtype)
    self.fc2_kernel = param(rngs, (hidden, llm_hidden), ("mlp", "embed"), param_dtype)
    self.bias = bool(cfg.bias)
    if self.bias:
      self.fc1_bias = param(rngs, (hidden,), ("mlp",), param_dtype, "zeros")
      self.fc2_bias = param(rngs, (llm_hidden,), ("embed",), param_dtype, "zeros")

  @exact_in_fp32
  def __call__(self, features):
    t, n, dv = features.shape
    side = round(n ** 0.5)
    if side * side != n:
      raise ValueError(f"{n} patch features per tile do not form a square grid")
    x = pixel_shuffle(features.reshape(t, side, side, dv), self.ratio)
    x = x.reshape(t, -1, x.shape[-1]).astype(self.compute_dtype)
    cast = lambda v: v[...].astype(self.compute_dtype)
    x = layer_norm(x, self.norm_scale[...], self.norm_bias[...], self.eps)
    x = jnp.einsum("tnc,ch->tnh", x, cast(self.fc1_kernel))
    if self.bias:
      x = x + cast(self.fc1_bias)
    x = jax.nn.gelu(x, approximate=False)
    x = jnp.einsum("tnh,hd->tnd", x, cast(self.fc2_kernel))
    if self.bias:
      x = x + cast(self.fc2_bias)
    return x
