"""Long-VITA in plain PyTorch: InternViT -> pixel shuffle -> projector -> Qwen2.

The architecture is that of docs/design.md#model.

Module names are the long_vita checkpoint keys (`model.vision_model.*`, `model.vision_projection.*`,
`model.layers.N.*`, `lm_head`), so loading that layout is `load_state_dict`. Only plain ops, so
it runs on CPU, CUDA and Ascend NPU. Attention is `F.scaled_dot_product_attention` with an
explicit boolean mask from segment ids and positions (docs/design.md#contracts): i sees j iff
seg[i] == seg[j] != 0 and pos[i] >= pos[j]; rows that see nothing (padding) give zeros.

The decoder takes an `attend(layer, q, k, v)` callback, so one forward serves the dense model,
a KV cache (generate.py) and context-parallel ring attention (ring.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vita_jax.spec.tokens import (
  check_visual_tokens,
  context_index,
  context_token_ids,
  tokens_per_tile,
)
from vita_torch.vision import InternViT, Projector

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


class RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * y.to(x.dtype)


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
    self.context_ids = context_token_ids(cfg.tokens)
    self.tokens_per_tile = tokens_per_tile(cfg)

  @property
  def device(self):
    return self.model.embed_tokens.weight.device

  @property
  def dtype(self):
    return self.model.embed_tokens.weight.dtype

  # ---- vision
  def vit_features(self, pixel_values):
    """[T, 3, H, W] -> InternViT patch features [T, N, Dv] (CLS dropped)."""
    return self.model.vision_model(pixel_values.to(self.device, self.dtype))

  def image_features(self, pixel_values):
    """[T, 3, H, W] -> projected visual tokens [T, tokens_per_tile, D]."""
    return self.model.vision_projection(self.vit_features(pixel_values))

  def context_mask(self, input_ids):
    return torch.isin(input_ids, torch.tensor(self.context_ids, device=input_ids.device))

  def context_index(self, input_ids, num_tiles: int):
    """int64 [B, S]: vita_jax.spec.tokens.context_index after checking that `input_ids` hold
    num_tiles blocks of context tokens (ValueError otherwise)."""
    ids = input_ids.cpu().numpy()
    check_visual_tokens(ids, self.context_ids, num_tiles, self.tokens_per_tile)
    return torch.from_numpy(context_index(ids, self.context_ids)).long().to(input_ids.device)

  def embed(self, input_ids, pixel_values=None, context_index=None):
    """Token embeddings [B, S, D] with visual features in place of the context tokens.

    context_index [B, S] (optional) says which visual token each context token takes; by
    default it counts them in order over batch then sequence. Context-parallel shards pass
    the indices of the full sequence, and only the tiles they need are encoded.
    """
    x = self.model.embed_tokens(input_ids)
    if pixel_values is None:
      return x
    mask, tpt = self.context_mask(input_ids), self.tokens_per_tile
    if context_index is None:
      context_index = self.context_index(input_ids, pixel_values.shape[0])
    wanted = context_index[mask]
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
