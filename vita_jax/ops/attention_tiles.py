"""Attention tile kernels shared by the ring, the single-device chunked kernel and decoding.

Two families:
- `merge_partials` / `merge_across`: normalised partial softmaxes (vita_jax.ops.dense's
  `partial_attention`, token-major [B, S, Hkv, G, D]) merged by log-sum-exp; used by decoding
  over a sharded cache.
- `tile_forward` / `tile_backward`: the ring's flash-style tiles in a head-major layout
  (q [B, Hkv, G*cq, D], k/v [B, Hkv, ck, D]) so every score matmul is a plain batched matmul
  with no transposes around it. The forward keeps an unnormalised running (acc, max, sum); a
  tile is skipped, computed without any mask, or computed with the mask, as `tile_kind` says.

Masks come from the segment ids and positions of the tokens (any layout: contiguous, zigzag,
packed); segment id 0 is padding and sees nothing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from vita_jax.ops.dense import attention_mask

SKIP, FULL, MASKED = 0, 1, 2
_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Combine two attentions over disjoint key sets. out [..., D] fp32, lse [...] fp32.

  A row with no visible keys has lse = -inf and out = 0 on either side; the merge keeps that
  (weights exp(-inf) = 0) instead of producing NaN.
  """
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
  out = out_a * jnp.exp(lse_a - safe)[..., None] + out_b * jnp.exp(lse_b - safe)[..., None]
  return out, lse


def merge_across(out, lse, axis_name: str):
  """merge_partials over every shard of mesh axis `axis_name` (inside shard_map): pmax and psum
  of out-sized arrays, never a gather. out [..., D] fp32, lse [...] fp32; same -inf rules."""
  top = lax.pmax(lse, axis_name)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weight = jnp.exp(lse - top)                       # 0 where a shard sees nothing
  total = lax.psum(weight, axis_name)
  out = lax.psum(out * weight[..., None], axis_name) / jnp.where(total > 0, total, 1.0)[..., None]
  lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
  return out, lse


def may_attend(q_seg, q_pos, kv_seg, kv_pos, causal: bool):
  """Scalar bool: False only if no query of the block can see any key of the block.

  Decided from the actual ranges of non-padding segment ids and positions, so it is correct
  for any token layout (it may say True for a block that is masked after all).
  """
  q_valid, kv_valid = q_seg != 0, kv_seg != 0
  q_lo, q_hi = jnp.min(jnp.where(q_valid, q_seg, _INT_MAX)), jnp.max(q_seg)
  kv_lo, kv_hi = jnp.min(jnp.where(kv_valid, kv_seg, _INT_MAX)), jnp.max(kv_seg)
  overlap = (q_lo <= kv_hi) & (kv_lo <= q_hi)
  if causal:
    q_pos_hi = jnp.max(jnp.where(q_valid, q_pos, _INT_MIN))
    kv_pos_lo = jnp.min(jnp.where(kv_valid, kv_pos, _INT_MAX))
    overlap &= q_pos_hi >= kv_pos_lo
  return overlap


def all_visible(q_seg, q_pos, kv_seg, kv_pos, causal: bool):
  """Scalar bool: True only if every query of the block sees every key (no mask needed):
  one non-padding segment on both sides and, if causal, every key at or before every query."""
  seg = q_seg[:, :1]                                 # [B, 1]: one segment per batch row
  same = jnp.all(q_seg == seg) & jnp.all(kv_seg == seg) & jnp.all(seg != 0)
  if causal:
    same &= jnp.min(q_pos) >= jnp.max(kv_pos)
  return same


def tile_kind(q_seg, q_pos, kv_seg, kv_pos, causal: bool):
  """int32 scalar: SKIP (nothing visible), FULL (everything visible) or MASKED (the rest)."""
  kind = jnp.where(all_visible(q_seg, q_pos, kv_seg, kv_pos, causal), FULL, MASKED)
  return jnp.where(may_attend(q_seg, q_pos, kv_seg, kv_pos, causal), kind, SKIP)


def tile_kinds(q_ids, kv_ids, q_chunk: int, kv_chunk: int, causal: bool):
  """`tile_kind` of every (q tile, kv tile) pair of a block at once -> int32 [nq, nk].

  q_ids [2, B, Sq] / kv_ids [2, B, Sk] = (segment ids, positions), tiles of q_chunk / kv_chunk
  tokens. A few reductions over the whole block instead of several per tile inside the tile
  loops (each a separate small op); equal to `tile_kind` tile by tile.
  """
  def stats(ids, chunk):                          # per (batch row, tile) -> [B, n]
    seg, pos = (x.reshape(x.shape[0], -1, chunk) for x in ids)
    valid = seg != 0
    first = seg[..., 0]
    return dict(lo=jnp.min(jnp.where(valid, seg, _INT_MAX), -1), hi=jnp.max(seg, -1),
                one=jnp.all(seg == first[..., None], -1) & (first != 0), first=first,
                pos_min=jnp.min(pos, -1), pos_max=jnp.max(pos, -1),
                valid_pos_lo=jnp.min(jnp.where(valid, pos, _INT_MAX), -1),
                valid_pos_hi=jnp.max(jnp.where(valid, pos, _INT_MIN), -1))

  q, kv = stats(q_ids, q_chunk), stats(kv_ids, kv_chunk)
  pair = lambda a, b: (a[:, :, None], b[:, None, :])           # [B, nq, 1], [B, 1, nk]
  lo_q, lo_kv = (jnp.min(x["lo"], 0) for x in (q, kv))        # over the batch rows: [n]
  hi_q, hi_kv = (jnp.max(x["hi"], 0) for x in (q, kv))
  may = (lo_q[:, None] <= hi_kv[None]) & (lo_kv[None] <= hi_q[:, None])
  a, b = pair(q["first"], kv["first"])
  one_q, one_kv = pair(q["one"], kv["one"])
  full = jnp.all(one_q & one_kv & (a == b), axis=0)
  if causal:
    may &= jnp.max(q["valid_pos_hi"], 0)[:, None] >= jnp.min(kv["valid_pos_lo"], 0)[None]
    full &= jnp.min(q["pos_min"], 0)[:, None] >= jnp.max(kv["pos_max"], 0)[None]
  return jnp.where(may, jnp.where(full, FULL, MASKED), SKIP).astype(jnp.int32)


def _tile_mask(q_seg, q_pos, kv_seg, kv_pos, causal: bool, groups: int):
  """bool [B, 1, G*cq, ck] for head-major scores (the G query groups stacked along rows)."""
  mask = attention_mask(q_seg, q_pos, kv_seg, kv_pos, causal)[:, None]      # [B, 1, cq, ck]
  return jnp.tile(mask, (1, 1, groups, 1)) if groups > 1 else mask


def _tile_mask_t(q_seg, q_pos, kv_seg, kv_pos, causal: bool, groups: int):
  """The transpose of _tile_mask, bool [B, 1, ck, G*cq], built directly in that order."""
  mask = (kv_seg[:, :, None] == q_seg[:, None, :]) & (q_seg[:, None, :] != 0)
  if causal:
    mask &= q_pos[:, None, :] >= kv_pos[:, :, None]
  mask = mask[:, None]
  return jnp.tile(mask, (1, 1, 1, groups)) if groups > 1 else mask


def tile_forward(q, k, v, ids, state, *, masked: bool, causal: bool, scale: float, groups: int):
  """One online-softmax step. q [B,H,M,D] (M = G*cq rows), k/v [B,H,ck,D], ids = (q_seg,
  q_pos [B,cq], kv_seg, kv_pos [B,ck]), state = (acc [B,H,M,D], max [B,H,M], sum [B,H,M]) fp32,
  max in scaled units (-inf where nothing was seen yet). masked=False assumes all_visible."""
  acc, row_max, row_sum = state
  s = jnp.einsum("bhmd,bhkd->bhmk", q, k, preferred_element_type=jnp.float32)
  if masked:
    s = jnp.where(_tile_mask(*ids, causal, groups), s, -jnp.inf)
  new_max = jnp.maximum(row_max, jnp.max(s, axis=-1) * scale)
  safe_max = jnp.where(jnp.isneginf(new_max), 0.0, new_max)   # rows that saw nothing
  p = jnp.exp(s * scale - safe_max[..., None])
  correction = jnp.exp(row_max - safe_max)
  row_sum = row_sum * correction + jnp.sum(p, axis=-1)
  pv = jnp.einsum("bhmk,bhkd->bhmd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return acc * correction[..., None] + pv, new_max, row_sum


def tile_backward(q, k, k_t, v, dout, lse, delta, ids, *, masked: bool, causal: bool,
                  scale: float, groups: int):
  """Unscaled gradients of one tile, computed key-major (scores transposed, [B,H,ck,M]) so that
  every matmul reads its left operand along its last axis (the fast CPU path, no transposes).

  q/dout [B,H,M,D], k/v [B,H,ck,D], k_t [B,H,D,ck] (k transposed, for dq); lse/delta
  [B,H,M] fp32 (lse finite: rows with nothing visible carry 0, all their keys are masked).
  Returns (dq_t [B,H,D,M], dk [B,H,ck,D], dv [B,H,ck,D]) fp32; the true dq and dk are `scale`
  times these.
  """
  s_t = jnp.einsum("bhkd,bhmd->bhkm", k, q, preferred_element_type=jnp.float32)
  p_t = jnp.exp(s_t * scale - lse[:, :, None, :])
  if masked:
    p_t = jnp.where(_tile_mask_t(*ids, causal, groups), p_t, 0.0)
  dp_t = jnp.einsum("bhkd,bhmd->bhkm", v, dout, preferred_element_type=jnp.float32)
  ds_t = (p_t * (dp_t - delta[:, :, None, :])).astype(q.dtype)
  dv = jnp.einsum("bhkm,bhmd->bhkd", p_t.astype(dout.dtype), dout,
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhkm,bhmd->bhkd", ds_t, q, preferred_element_type=jnp.float32)
  dq_t = jnp.einsum("bhdk,bhkm->bhdm", k_t, ds_t, preferred_element_type=jnp.float32)
  return dq_t, dk, dv
