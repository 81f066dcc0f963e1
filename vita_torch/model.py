"""Long-VITA in plain PyTorch (DESIGN §2): InternViT -> pixel shuffle -> projector -> Qwen2.

Module names are the long_vita checkpoint keys (`model.vision_model.*`, `model.vision_projection.*`,
`model.layers.N.*`, `lm_head`), so loading that layout is `load_state_dict`. Only plain ops, so
it runs on CPU, CUDA and Ascend NPU. Attention is `F.scaled_dot_product_attention` with an
explicit boolean mask from segment ids and positions (DESIGN §5): i sees j iff
seg[i] == seg[j] != 0 and pos[i] >= pos[j]; rows that see nothing (padding) give zeros.

The decoder takes an `attend(layer, q, k, v)` callback, so one forward serves the dense model,
a KV cache (generate.py) and context-parallel ring attention (ring.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Shapes: q [B, S, Hq, D], k/v [B, S, Hkv, D], segment ids / positions [B, S] (int).


def attention_mask(seg_q, pos_q, seg_k, pos_k, causal: bool = True):
  """bool [B, Sq, Sk]: which keys each query may see."""
  mask = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
  if causal:
    mask &= pos_q[:, :, None] >= pos_k[:, None, :]
  return mask


def dense_attention(q, k, v, seg_q, pos_q, seg_k=None, pos_k=None, *, causal=True, scale=None):
  """SDPA with the segment/position mask; GQA by repeating K/V heads. -> [B, Sq, Hq, D]."""
  seg_k = seg_q if seg_k is None else seg_k
  pos_k = pos_q if pos_k is None else pos_k
  mask = attention_mask(seg_q, pos_q, seg_k, pos_k, causal)
  empty = ~mask.any(-1)                              # padding rows: unmask, then zero the output
  mask = mask | empty[..., None]
  groups = q.shape[2] // k.shape[2]
  k, v = (t.repeat_interleave(groups, dim=2) if groups > 1 else t for t in (k, v))
  out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[:, None], scale=scale)
  return out.transpose(1, 2).masked_fill(empty[..., None, None], 0.0)


def rope_tables(positions, head_dim: int, theta: float):
  """cos, sin [B, S, head_dim] in fp32 for integer positions [B, S]."""
  exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponent)
  angles = positions.float()[..., None] * inv_freq
  angles = torch.cat([angles, angles], dim=-1)
  return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
  """Rotate-half RoPE on x [B, S, H, D], computed in fp32."""
  xf = x.float()
  half = x.shape[-1] // 2
  rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
  return (xf * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def layer_norm(module: nn.LayerNorm, x):
  """LayerNorm with fp32 statistics (as vita_jax), result in x's dtype."""
  return F.layer_norm(x.float(), module.normalized_shape, module.weight.float(),
                      module.bias.float(), module.eps).to(x.dtype)


class RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * y.to(x.dtype)


# ---------------------------------------------------------------- InternViT (OpenGVLab names)

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
  """[T, H, W, C] -> [T, H*r, W*r, C/r^2], channels (row offset, col offset, c) (DESIGN §2)."""
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


# ---------------------------------------------------------------- Qwen2 (transformers names)

class Qwen2Attention(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d, hd = cfg.hidden_size, cfg.head_dim
    self.hq, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, hd
    self.q_proj = nn.Linear(d, self.hq * hd, bias=True)
    self.k_proj = nn.Linear(d, self.hkv * hd, bias=True)
    self.v_proj = nn.Linear(d, self.hkv * hd, bias=True)
    self.o_proj = nn.Linear(self.hq * hd, d, bias=False)


class Qwen2MLP(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
    self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
    self.down_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False)

  def forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Qwen2Attention(cfg)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = Qwen2MLP(cfg)

  def forward(self, x, cos, sin, attend):
    a = self.self_attn
    b, s, _ = x.shape
    h = self.input_layernorm(x)
    q = apply_rope(a.q_proj(h).view(b, s, a.hq, a.hd), cos, sin)
    k = apply_rope(a.k_proj(h).view(b, s, a.hkv, a.hd), cos, sin)
    v = a.v_proj(h).view(b, s, a.hkv, a.hd)
    x = x + a.o_proj(attend(q, k, v).reshape(b, s, a.hq * a.hd))
    return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------- the whole model

class LongVITAModel(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    m = cfg.llm
    self.embed_tokens = nn.Embedding(m.vocab_size, m.hidden_size)
    self.layers = nn.ModuleList(DecoderLayer(m) for _ in range(m.num_layers))
    self.norm = RMSNorm(m.hidden_size, m.rms_norm_eps)
    self.vision_model = InternViT(cfg.vision)
    self.vision_projection = Projector(cfg)


class LongVITAForCausalLM(nn.Module):
  """`model(input_ids, pixel_values=None, positions=None, segment_ids=None) -> logits [B,S,V]`.

  pixel_values [tiles, 3, H, W] (normalised); their features replace the visual context
  tokens' embeddings in order, flattened over batch then sequence.
  """

  def __init__(self, cfg):
    super().__init__()
    self.cfg = cfg
    self.model = LongVITAModel(cfg)
    if not cfg.llm.tie_embeddings:
      self.lm_head = nn.Linear(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False)
    t = cfg.tokens
    ids = [t.get(k, -1) for k in ("img_context_id", "patch_context_id", "vid_context_id",
                                  "image_token_id")]
    self.context_ids = sorted({int(i) for i in ids if i is not None and i >= 0})

  @property
  def device(self):
    return self.model.embed_tokens.weight.device

  @property
  def dtype(self):
    return self.model.embed_tokens.weight.dtype

  # ---- vision
  def vision_features(self, pixel_values):
    """[T, 3, H, W] -> InternViT patch features [T, N, Dv] (CLS dropped)."""
    return self.model.vision_model(pixel_values.to(self.device, self.dtype))

  def image_features(self, pixel_values):
    """[T, 3, H, W] -> projected visual tokens [T, tokens_per_tile, D]."""
    return self.model.vision_projection(self.vision_features(pixel_values))

  def context_mask(self, input_ids):
    return torch.isin(input_ids, torch.tensor(self.context_ids, device=input_ids.device))

  def embed(self, input_ids, pixel_values=None, feature_index=None):
    """Token embeddings [B, S, D] with visual features in place of the context tokens.

    feature_index [B, S] (optional) says which visual token each context token takes; by
    default it counts them in order over batch then sequence. Context-parallel shards pass
    the indices of the full sequence, and only the tiles they need are encoded.
    """
    x = self.model.embed_tokens(input_ids)
    if pixel_values is None:
      return x
    mask = self.context_mask(input_ids)
    tpt = int((self.cfg.vision.image_size // self.cfg.vision.patch_size
               * self.cfg.downsample_ratio) ** 2)
    if feature_index is None:
      if int(mask.sum()) != pixel_values.shape[0] * tpt:
        raise ValueError(f"input_ids hold {int(mask.sum())} visual context tokens but "
                         f"pixel_values has {pixel_values.shape[0]} tiles x {tpt} tokens; "
                         "build the prompt with one image block per tile")
      feature_index = (torch.cumsum(mask.reshape(-1).long(), 0) - 1).reshape(mask.shape)
    wanted = feature_index[mask]
    if wanted.numel() == 0:
      return x
    tiles = torch.unique(wanted // tpt)
    feats = self.image_features(pixel_values[tiles.to(pixel_values.device)])
    slot = torch.searchsorted(tiles, wanted // tpt) * tpt + wanted % tpt
    x = x.clone()
    x[mask] = feats.reshape(-1, feats.shape[-1])[slot].to(x.dtype)
    return x

  # ---- language model
  def decode(self, x, positions, attend):
    """Embeddings [B, S, D] -> final-normed hidden [B, S, D]; attend(layer, q, k, v) -> o."""
    cfg = self.cfg.llm
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    for i, layer in enumerate(self.model.layers):
      x = layer(x, cos, sin, lambda q, k, v, i=i: attend(i, q, k, v))
    return self.model.norm(x)

  def logits(self, hidden):
    w = self.model.embed_tokens.weight if self.cfg.llm.tie_embeddings else self.lm_head.weight
    return F.linear(hidden, w)

  def forward(self, input_ids, pixel_values=None, positions=None, segment_ids=None):
    b, s = input_ids.shape
    input_ids = input_ids.to(self.device)
    if positions is None:
      positions = torch.arange(s, device=self.device).expand(b, s)
    if segment_ids is None:
      segment_ids = torch.ones_like(input_ids)
    positions, segment_ids = positions.to(self.device), segment_ids.to(self.device)
    x = self.embed(input_ids, pixel_values)

    def attend(_, q, k, v):
      return dense_attention(q, k, v, segment_ids, positions)

    return self.logits(self.decode(x, positions, attend))
