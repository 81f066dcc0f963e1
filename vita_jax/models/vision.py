"""InternViT (docs/design.md#model): conv patch embedding, CLS token, learned absolute position
embedding, pre-LayerNorm blocks with per-channel layer scale, bidirectional attention. No final
norm (InternViT-300M, transformers' `use_mean_pooling=True`); the CLS output is dropped.

Pixels come in NHWC: [tiles, H, W, 3], normalised.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vita_jax.models.common import exact_in_fp32, layer_norm, param, run_layers, values
from vita_jax.ops.attention import attention

LAYER_PARAMS = ("norm1_scale", "norm1_bias", "qkv_kernel", "qkv_bias", "proj_kernel",
                "proj_bias", "ls1", "norm2_scale", "norm2_bias", "fc1_kernel", "fc1_bias",
                "fc2_kernel", "fc2_bias", "ls2")


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution kernel with torch's a=-0.75."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bicubic resize (align_corners=False, edge clamp)."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    src = (o + 0.5) * scale - 0.5        # no clamp at 0 for cubic, as torch does
    base = math.floor(src)
    t = src - base
    for k in range(-1, 3):
      m[o, min(max(base + k, 0), n_in - 1)] += _cubic(np.float64(k - t))
  return m


def resize_position_embedding(pos, side_in: int, side_out: int):
  """pos [1 + side_in**2, D] -> [1 + side_out**2, D]: bicubic on the patch grid, CLS kept."""
  if side_in == side_out:
    return pos
  m = jnp.asarray(bicubic_matrix(side_in, side_out), jnp.float32)
  grid = pos[1:].reshape(side_in, side_in, -1).astype(jnp.float32)
  grid = jnp.einsum("oh,hwd,pw->opd", m, grid, m, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos[:1], grid.reshape(side_out * side_out, -1).astype(pos.dtype)], 0)


class VisionLayers(nnx.Module):
  """The stacked parameters of all InternViT blocks ([layers, ...])."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype):
    n, d, h, m = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.mlp_dim
    hd = d // h
    ls = cfg.layer_scale_init
    self.norm1_scale = param(rngs, (n, d), ("layers", "norm"), dtype, "ones")
    self.norm1_bias = param(rngs, (n, d), ("layers", "norm"), dtype, "zeros")
    self.qkv_kernel = param(rngs, (n, d, 3, h, hd),
                            ("layers", "vision_embed", None, "vision_heads", "head_dim"), dtype)
    self.qkv_bias = param(rngs, (n, 3, h, hd), ("layers", None, "vision_heads", "head_dim"),
                          dtype, "zeros")
    self.proj_kernel = param(rngs, (n, h, hd, d),
                             ("layers", "vision_heads", "head_dim", "vision_embed"), dtype)
    self.proj_bias = param(rngs, (n, d), ("layers", "vision_embed"), dtype, "zeros")
    self.ls1 = param(rngs, (n, d), ("layers", "norm"), dtype, "const", value=ls)
    self.norm2_scale = param(rngs, (n, d), ("layers", "norm"), dtype, "ones")
    self.norm2_bias = param(rngs, (n, d), ("layers", "norm"), dtype, "zeros")
    self.fc1_kernel = param(rngs, (n, d, m), ("layers", "vision_embed", "vision_mlp"), dtype)
    self.fc1_bias = param(rngs, (n, m), ("layers", "vision_mlp"), dtype, "zeros")
    self.fc2_kernel = param(rngs, (n, m, d), ("layers", "vision_mlp", "vision_embed"), dtype)
    self.fc2_bias = param(rngs, (n, d), ("layers", "vision_embed"), dtype, "zeros")
    self.ls2 = param(rngs, (n, d), ("layers", "norm"), dtype, "const", value=ls)


def vision_block(p: dict, x, *, eps: float, attn_kwargs: dict):
  """One InternViT block. x [T, N, D] -> [T, N, D]."""
  t, n, _ = x.shape
  h = layer_norm(x, p["norm1_scale"], p["norm1_bias"], eps)
  qkv = jnp.einsum("tnd,dchk->ctnhk", h, p["qkv_kernel"]) + p["qkv_bias"][:, None, None]
  ones = jnp.ones((t, n), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (t, n))
  o = attention(qkv[0], qkv[1], qkv[2], ones, positions, causal=False, **attn_kwargs)
  o = jnp.einsum("tnhk,hkd->tnd", o, p["proj_kernel"]) + p["proj_bias"]
  x = x + p["ls1"] * o
  h = layer_norm(x, p["norm2_scale"], p["norm2_bias"], eps)
  h = jax.nn.gelu(jnp.einsum("tnd,dm->tnm", h, p["fc1_kernel"]) + p["fc1_bias"],
                  approximate=False)
  h = jnp.einsum("tnm,md->tnd", h, p["fc2_kernel"]) + p["fc2_bias"]
  return x + p["ls2"] * h


class InternViT(nnx.Module):
  """pixel_values [T, H, W, 3] -> patch features [T, (H/p)*(W/p), D] (CLS dropped)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, param_dtype="float32", compute_dtype="float32",
               remat="none", scan_layers=True, attention_cfg=None):
    self.cfg = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    self.side = cfg.image_size // p                 # patch grid side of the position table
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.remat = remat
    self.scan_layers = scan_layers
    self.attention_cfg = dict(attention_cfg or {})
    self.patch_kernel = param(rngs, (p, p, 3, d), ("conv", "conv", "conv", "vision_embed"),
                              param_dtype)
    self.patch_bias = param(rngs, (d,), ("vision_embed",), param_dtype, "zeros")
    self.cls_token = param(rngs, (d,), ("vision_embed",), param_dtype)
    self.pos_embed = param(rngs, (1 + self.side ** 2, d), ("positions", "vision_embed"),
                           param_dtype)
    self.layers = VisionLayers(cfg, rngs=rngs, dtype=param_dtype)

  def embed(self, pixel_values):
    """Patch + CLS + position embeddings. [T, H, W, 3] -> [T, 1 + N, D]."""
    t, hgt, wid, c = pixel_values.shape
    p = self.cfg.patch_size
    if hgt != wid or hgt % p:
      raise ValueError(f"tiles must be square with a side divisible by patch_size={p}; "
                       f"got pixel_values of shape {pixel_values.shape}")
    side = hgt // p
    x = pixel_values.astype(self.compute_dtype)
    # A stride-p conv is a matmul over non-overlapping p x p x 3 patches (HWIO kernel).
    x = x.reshape(t, side, p, side, p, c).transpose(0, 1, 3, 2, 4, 5)
    kernel = self.patch_kernel[...].astype(self.compute_dtype)
    x = jnp.einsum("tyxhwc,hwcd->tyxd", x, kernel) + self.patch_bias[...].astype(x.dtype)
    x = x.reshape(t, side * side, -1)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (t, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    pos = resize_position_embedding(self.pos_embed[...], self.side, side)
    return x + pos.astype(x.dtype)[None]

  @exact_in_fp32
  def __call__(self, pixel_values, *, mesh=None):
    # Tiles are spread over the batch-like mesh axes; each tile's tokens stay together, so the
    # attention inside a tile is always local (never the sequence ring).
    from vita_jax.parallel.sharding import constrain
    x = constrain(self.embed(pixel_values), ("tiles", None, "act_embed"), mesh)
    stacked = values(self.layers, LAYER_PARAMS, self.compute_dtype)
    attn_kwargs = dict(mesh=None, **self.attention_cfg)
    eps = self.cfg.layer_norm_eps

    def body(x, p):
      return constrain(vision_block(p, x, eps=eps, attn_kwargs=attn_kwargs),
                       ("tiles", None, "act_embed"), mesh)

    x = run_layers(body, x, stacked, scan=self.scan_layers, remat_policy=self.remat)
    return x[:, 1:]
