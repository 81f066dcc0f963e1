"""InternViT vision tower and the pixel-shuffle projector in plain PyTorch (docs/design.md#model).

Module names are the OpenGVLab checkpoint keys (`embeddings.*`, `encoder.layers.N.*`), so the
long_vita layout loads them under `model.vision_model.*` / `model.vision_projection.*`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm(module: nn.LayerNorm, x):
  """LayerNorm with fp32 statistics (as vita_jax), result in x's dtype."""
  return F.layer_norm(x.float(), module.normalized_shape, module.weight.float(),
                      module.bias.float(), module.eps).to(x.dtype)


class VisionEmbeddings(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d, p = cfg.hidden_size, cfg.patch_size
    self.side = cfg.image_size // p
    self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
    self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p)
    self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.side ** 2, d))

  def forward(self, pixel_values):                   # [T, 3, H, W] -> [T, 1 + N, D]
    x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
    side = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    pos = self.position_embedding
    if side != self.side:                            # bicubic resize of the patch grid, CLS kept
      grid = pos[:, 1:].reshape(1, self.side, self.side, -1).permute(0, 3, 1, 2).float()
      grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
      pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)
                       .to(pos.dtype)], 1)
    cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
    return torch.cat([cls, x], 1) + pos.to(x.dtype)


class VisionAttention(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.heads = cfg.num_heads
    self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
    self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

  def forward(self, x):
    t, n, d = x.shape
    q, k, v = self.qkv(x).view(t, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v)      # bidirectional within a tile
    return self.proj(o.transpose(1, 2).reshape(t, n, d))


class VisionMLP(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_dim)
    self.fc2 = nn.Linear(cfg.mlp_dim, cfg.hidden_size)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d = cfg.hidden_size
    self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
    self.attn = VisionAttention(cfg)
    self.ls1 = nn.Parameter(torch.full((d,), cfg.layer_scale_init))
    self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
    self.mlp = VisionMLP(cfg)
    self.ls2 = nn.Parameter(torch.full((d,), cfg.layer_scale_init))

  def forward(self, x):
    x = x + self.ls1 * self.attn(layer_norm(self.norm1, x))
    return x + self.ls2 * self.mlp(layer_norm(self.norm2, x))


class VisionEncoder(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class InternViT(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.embeddings = VisionEmbeddings(cfg)
    self.encoder = VisionEncoder(cfg)

  def forward(self, pixel_values):                   # [T, 3, H, W] -> [T, N, D] (CLS dropped)
    x = self.embeddings(pixel_values)
    for layer in self.encoder.layers:
      x = layer(x)
    return x[:, 1:]


def pixel_shuffle(x, ratio: float):
  """[T, H, W, C] -> [T, H*r, W*r, C/r^2] with channels in (row offset, col offset, c) order,
  the order docs/design.md#model requires."""
  t, h, w, c = x.shape
  f = round(1 / ratio)
  if h % f or w % f:
    raise ValueError(f"the patch grid {h}x{w} is not divisible by 1/downsample_ratio={f}")
  x = x.reshape(t, h // f, f, w // f, f, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(t, h // f, w // f, f * f * c)


class Projector(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d_in = cfg.vision.hidden_size * round(1 / cfg.downsample_ratio) ** 2
    p = cfg.projector
    self.ratio = cfg.downsample_ratio
    self.pre_proj_layernorm = nn.LayerNorm(d_in, eps=p.layer_norm_eps)
    self.mlp = nn.Sequential(nn.Linear(d_in, p.hidden_size, bias=p.bias), nn.GELU(),
                             nn.Linear(p.hidden_size, cfg.llm.hidden_size, bias=p.bias))

  def forward(self, features):                       # [T, N, Dv] -> [T, N*r^2, D]
    t, n, dv = features.shape
    side = round(n ** 0.5)
    x = pixel_shuffle(features.reshape(t, side, side, dv), self.ratio)
    x = layer_norm(self.pre_proj_layernorm, x.reshape(t, -1, x.shape[-1]))
    return self.mlp(x)
