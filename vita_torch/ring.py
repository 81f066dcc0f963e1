"""Context parallelism over `torch.distributed`: ring attention for prefill, a sharded KV cache
merge for decode. Works with any backend (hccl on NPU, nccl on GPU, gloo on CPU).

Layout: the zigzag of vita_jax/spec/zigzag.py. The (padded) sequence is cut into 2N chunks
and rank r holds chunks r and 2N-1-r, which balances causal work. The mask comes from the segment
ids and positions that travel with K/V, so the layout never enters the attention math.

Prefill (`ring_attention`): each step a rank attends its queries to the K/V block it holds while
`batch_isend_irecv` passes that block on to rank+1; the per-block results are merged with their
log-sum-exp in fp32 (`merge`). A block is computed by `block_attention`: FlexAttention (fused,
compiled) on CUDA, `torch_npu.npu_fusion_attention` tiles on Ascend NPUs, fp32 einsum tiles
elsewhere (`impl=` chooses).

Decode (`sharded_decode_attention`): each rank keeps the K/V of its own tokens; a new query is
attended against every shard locally and the partial softmaxes are combined by an all-reduce of
the max, the sum and the numerator, so no rank ever holds the whole cache.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from vita_jax.spec.zigzag import zigzag_permutation
from vita_torch.model import attention_mask

# q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], segment ids / positions [B, S]; lse [B, Sq, Hq] fp32.


def zigzag_indices(seq_len: int, rank: int, world: int) -> torch.Tensor:
  """Global token indices rank `rank` holds: chunks rank and 2*world-1-rank of 2*world."""
  return torch.from_numpy(zigzag_permutation(seq_len, world).reshape(world, -1)[rank].copy())


def _block_attention(q, k, v, mask, scale):
  """Softmax of q over one key block with its log-sum-exp; mask [B, Sq, Sk]."""
  b, sq, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.float().reshape(b, sq, hkv, hq // hkv, d)          # GQA: group queries by KV head
  scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.float()) * scale
  scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
  row_max = scores.amax(-1, keepdim=True)
  row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
  p = torch.exp(scores - row_max)                             # masked entries: exp(-inf) = 0
  denom = p.sum(-1, keepdim=True)
  out = torch.einsum("bhgqk,bkhd->bqhgd", p / denom.clamp_min(1e-30), v.float())
  lse = (row_max + torch.log(denom)).squeeze(-1)              # [B, Hkv, G, Sq]
  return out.reshape(b, sq, hq, d), lse.permute(0, 3, 1, 2).reshape(b, sq, hq)


def _tiled(q, k, v, seg_q, pos_q, seg_k, pos_k, tile, *, causal, q_chunk, kv_chunk):
  """(out fp32, lse fp32) of q against one K/V block, tile by tile: `tile(q, k, v, mask)` ->
  (out, lse) of one (q tile, kv tile) pair, mask [B, sq, sk] True = visible; tiles with
  nothing visible are skipped, the rest merged by `merge`. Rows that see no key get out 0 and
  lse -inf (they merge as "nothing")."""
  b, sq, hq, d = q.shape
  out = torch.zeros(b, sq, hq, d, dtype=torch.float32, device=q.device)
  lse = torch.full((b, sq, hq), float("-inf"), device=q.device)
  for qs in range(0, sq, q_chunk):
    qe = min(sq, qs + q_chunk)
    acc = None
    for ks in range(0, k.shape[1], kv_chunk):
      ke = min(k.shape[1], ks + kv_chunk)
      mask = attention_mask(seg_q[:, qs:qe], pos_q[:, qs:qe], seg_k[:, ks:ke], pos_k[:, ks:ke],
                            causal)
      if not bool(mask.any()):
        continue
      part = tile(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], mask)
      acc = part if acc is None else merge(*acc, *part)
    if acc is not None:
      out[:, qs:qe], lse[:, qs:qe] = acc
  return out, lse


def lse_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, *, causal=True, scale=None,
                  q_chunk: int = 1024, kv_chunk: int = 4096):
  """Attention of q to one K/V block with its log-sum-exp: (out fp32, lse fp32).

  Tiled over queries and keys (flash-attention style, merged by `merge`) so memory stays
  O(q_chunk * kv_chunk) however long the shards are; tiles with nothing visible are skipped.
  Rows that see no key get out 0 and lse -inf (they merge as "nothing").
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  tile = lambda q, k, v, mask: _block_attention(q, k, v, mask, scale)
  return _tiled(q, k, v, seg_q, pos_q, seg_k, pos_k, tile, causal=causal, q_chunk=q_chunk,
                kv_chunk=kv_chunk)


def flex_lse_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, *, causal=True, scale=None):
  """`lse_attention` as one FlexAttention call: (out fp32, lse fp32, natural log).

  The block mask is built from the segment ids and positions (FlexAttention skips the blocks
  with nothing visible); GQA without repeating K/V. Compiled into a fused kernel on CUDA; on
  other devices FlexAttention runs its unfused reference (how the CPU tests check the mask, the
  LSE and the empty rows against the eager path).
  """
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention

  def visible(b, h, qi, ki):
    ok = (seg_q[b, qi] == seg_k[b, ki]) & (seg_q[b, qi] != 0)
    return ok & (pos_q[b, qi] >= pos_k[b, ki]) if causal else ok

  mask = create_block_mask(visible, q.shape[0], None, q.shape[1], k.shape[1], device=q.device)
  run = _compiled_flex() if q.is_cuda else flex_attention
  out, lse = run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                 scale=scale, enable_gqa=True, return_lse=True)
  return out.transpose(1, 2).float(), lse.transpose(1, 2).float()


def npu_lse_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, *, causal=True, scale=None,
                      q_chunk: int = 1024, kv_chunk: int = 4096):
  """`lse_attention` with every tile computed by Ascend's fused `torch_npu.npu_fusion_attention`
  (BSND layout, GQA without repeating K/V, the tile's boolean mask with True = hidden):
  (out fp32, lse fp32, natural log).

  The kernel returns the row max and sum of the scaled scores ([B, Hq, Sq, 8], repeated), so the
  tile's LSE is max + log(sum); tiles merge as in the eager path. A row that sees no key of a
  tile gets out 0 and lse -inf here, whatever the kernel wrote for it (a fully hidden row is
  not "nothing" to it). Only called on NPU tensors, where `torch_npu` is already imported.
  """
  import torch_npu  # present wherever an NPU tensor exists (see vita_torch.device)

  scale = q.shape[-1] ** -0.5 if scale is None else scale

  def tile(q, k, v, mask):
    q, k, v = (x.contiguous() for x in (q, k, v))                 # tiles are strided views
    out, row_max, row_sum = torch_npu.npu_fusion_attention(
        q, k, v, q.shape[2], "BSND", atten_mask=~mask[:, None], scale=scale, keep_prob=1.0)[:3]
    lse = (row_max[..., 0] + torch.log(row_sum[..., 0])).float().transpose(1, 2)
    seen = mask.any(-1)[..., None]                                   # [B, sq, 1]
    return torch.where(seen[..., None], out.float(), 0.0), torch.where(seen, lse, float("-inf"))

  return _tiled(q, k, v, seg_q, pos_q, seg_k, pos_k, tile, causal=causal, q_chunk=q_chunk,
                kv_chunk=kv_chunk)


@functools.cache
def _compiled_flex():
  from torch.nn.attention.flex_attention import flex_attention
  return torch.compile(flex_attention, dynamic=False)


ATTENTION_IMPLS = ("auto", "eager", "flex", "npu")


def block_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, *, causal=True, scale=None,
                    impl: str = "auto", q_chunk: int = 1024, kv_chunk: int = 4096):
  """q against one K/V block with its log-sum-exp, by `impl`: "eager" (`lse_attention`'s fp32
  einsum tiles), "flex" (`flex_lse_attention`), "npu" (`npu_lse_attention`, Ascend's fused
  kernel per tile), "auto" (flex on CUDA, npu for half-precision NPU tensors, eager elsewhere)."""
  if impl == "auto":
    # fp32 on NPU stays on the fp32 eager tiles (the fused kernel is documented for fp16/bf16).
    npu = q.device.type == "npu" and q.dtype != torch.float32
    impl = "flex" if q.is_cuda else "npu" if npu else "eager"
  if impl == "flex":
    return flex_lse_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, causal=causal, scale=scale)
  if impl == "npu":
    return npu_lse_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, causal=causal, scale=scale,
                             q_chunk=q_chunk, kv_chunk=kv_chunk)
  if impl == "eager":
    return lse_attention(q, k, v, seg_q, pos_q, seg_k, pos_k, causal=causal, scale=scale,
                         q_chunk=q_chunk, kv_chunk=kv_chunk)
  raise ValueError(f"attention impl={impl!r} is unknown; use one of {ATTENTION_IMPLS}")


def merge(out, lse, block_out, block_lse):
  """Combine two partial attentions over disjoint key sets by their log-sum-exp (fp32)."""
  top = torch.maximum(lse, block_lse)
  top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
  w, bw = torch.exp(lse - top), torch.exp(block_lse - top)
  total = w + bw
  new_out = (out * w[..., None] + block_out * bw[..., None]) / total.clamp_min(1e-30)[..., None]
  return new_out, top + torch.log(total)


def _peers(group):
  group = group or dist.group.WORLD
  world, rank = dist.get_world_size(group), dist.get_rank(group)
  send_to = dist.get_global_rank(group, (rank + 1) % world)
  recv_from = dist.get_global_rank(group, (rank - 1) % world)
  return world, send_to, recv_from


def ring_attention(q, k, v, segment_ids, positions, *, group=None, causal=True, scale=None,
                   q_chunk: int = 1024, kv_chunk: int = 4096, impl: str = "auto"):
  """Attention over a sequence sharded across the ranks of `group`; returns q's dtype.

  Every argument is this rank's shard (any token layout; zigzag balances causal work). K/V and
  their ids go round the ring once; the transfer of the next block overlaps this block's math.
  """
  world, send_to, recv_from = _peers(group)
  block = [t.contiguous() for t in (k, v, segment_ids, positions)]
  out = lse = None
  for step in range(world):
    pending = []
    if step + 1 < world:
      incoming = [torch.empty_like(t) for t in block]
      ops = [dist.P2POp(dist.isend, t, send_to, group) for t in block]
      ops += [dist.P2POp(dist.irecv, t, recv_from, group) for t in incoming]
      pending = dist.batch_isend_irecv(ops)
    part = block_attention(q, block[0], block[1], segment_ids, positions, block[2], block[3],
                           causal=causal, scale=scale, impl=impl, q_chunk=q_chunk,
                           kv_chunk=kv_chunk)
    out, lse = part if out is None else merge(out, lse, *part)
    for request in pending:
      request.wait()
    if pending:
      block = incoming
  return out.to(q.dtype)


def sharded_decode_attention(q, segment_ids, positions, k, v, kv_segment_ids, kv_positions, *,
                             group=None, scale=None, kv_chunk: int = 4096,
                             impl: str = "eager"):
  """New queries [B, Sq, ...] against a KV cache sharded over `group` (this rank's part given).

  `impl` defaults to the eager tiles: a decode step has one query per row, where a fused
  kernel gains nothing and "flex" would rebuild its block mask for every layer and token.

  Partial softmax per rank, then all-reduce: max of the log-sum-exps, then the sums of the
  rescaled denominators and numerators. Returns q's dtype; identical on every rank.
  """
  out, lse = block_attention(q, k, v, segment_ids, positions, kv_segment_ids, kv_positions,
                             causal=True, scale=scale, impl=impl, kv_chunk=kv_chunk)
  top = lse.clone()
  dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
  top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
  weight = torch.exp(lse - top)                               # this shard's share of the sum
  numerator = out * weight[..., None]
  dist.all_reduce(weight, group=group)
  dist.all_reduce(numerator, group=group)
  return (numerator / weight.clamp_min(1e-30)[..., None]).to(q.dtype)
