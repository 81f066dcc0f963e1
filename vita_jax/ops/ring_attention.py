"""Ring attention: exact attention over a sequence sharded on a mesh axis (DESIGN §5).

Each device keeps its query block; key/value blocks travel around the ring with `ppermute`
together with their segment ids and positions, so the mask is right for any token layout
(contiguous, zigzag, packed). Partial results are merged by log-sum-exp in fp32.

The backward is a `custom_vjp` that keeps only the local q, k, v, output and log-sum-exp
(O(S / shards) per device), recomputes the scores block by block, and sends dK/dV around the
ring with their K/V block so they arrive back at the owner after a full turn.

Inside a block, work is split into q_chunk x kv_chunk tiles (so a 32K local block never builds a
32K x 32K score matrix), and tiles or whole blocks that the mask hides entirely are skipped,
decided from their actual segment and position ranges. With no ring axis the same kernel is the
single-device attention (`blockwise_attention`).

Shapes: q [B, S, Hq, D], k/v [B, S, Hkv, D] with Hq a multiple of Hkv (GQA: query heads are
grouped per KV head, K/V are never repeated); segment_ids/positions int32 [B, S].
Internally q is grouped as [B, S, Hkv, G, D] and the log-sum-exp is [B, S, Hkv, G].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from vita_jax.ops.attention import attention_mask

DEFAULT_Q_CHUNK = 512
DEFAULT_KV_CHUNK = 512
_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


class _Config(NamedTuple):
  axis_name: str | None  # the ring axis inside shard_map; None = one device, no ring
  num_shards: int
  causal: bool
  scale: float
  q_chunk: int
  kv_chunk: int


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


def _scores(q, k, q_seg, q_pos, kv_seg, kv_pos, cfg: _Config):
  """Masked fp32 scores [B, cq, Hkv, G, ck] and the mask broadcast to them."""
  s = jnp.einsum("bqhgd,bkhd->bqhgk", q, k, preferred_element_type=jnp.float32) * cfg.scale
  mask = attention_mask(q_seg, q_pos, kv_seg, kv_pos, cfg.causal)[:, :, None, None, :]
  return s, mask


def _tile_forward(q, k, v, q_seg, q_pos, kv_seg, kv_pos, cfg: _Config):
  """One q_chunk x kv_chunk tile -> (out [B,cq,Hkv,G,D] fp32 normalized, lse [B,cq,Hkv,G])."""
  s, mask = _scores(q, k, q_seg, q_pos, kv_seg, kv_pos, cfg)
  s = jnp.where(mask, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(mask, jnp.exp(s - row_max[..., None]), 0.0)
  denom = jnp.sum(p, axis=-1)
  out = jnp.einsum("bqhgk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / jnp.where(denom == 0, 1.0, denom)[..., None]
  lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
  return out, lse


def partial_attention(q, k, v, q_seg, q_pos, kv_seg, kv_pos, *, causal: bool = True,
                      scale: float | None = None):
  """Softmax of q [B,Q,Hq,D] over one key set k/v [B,K,Hkv,D] (the ring's tile kernel, no
  chunking) -> (normalised out fp32 [B,Q,Hkv,G,D], lse fp32 [B,Q,Hkv,G]; -inf where nothing is
  visible), ready for merge_partials / merge_across."""
  b, sq, hq, d = q.shape
  hkv = k.shape[2]
  scale = d ** -0.5 if scale is None else float(scale)
  cfg = _Config(None, 1, causal, scale, sq, k.shape[1])
  return _tile_forward(q.reshape(b, sq, hkv, hq // hkv, d), k, v, q_seg, q_pos, kv_seg, kv_pos,
                       cfg)


def _tile_backward(q, k, v, q_seg, q_pos, kv_seg, kv_pos, lse, dout, delta, cfg: _Config):
  """Gradients of one tile given the final lse and delta = sum(dout * out, -1).

  Returns dq [B,cq,Hkv,G,D], dk/dv [B,ck,Hkv,D], all fp32.
  """
  s, mask = _scores(q, k, q_seg, q_pos, kv_seg, kv_pos, cfg)
  lse = jnp.where(jnp.isneginf(lse), 0.0, lse)
  p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
  dp = jnp.einsum("bqhgd,bkhd->bqhgk", dout, v, preferred_element_type=jnp.float32)
  ds = (p * (dp - delta[..., None]) * cfg.scale).astype(q.dtype)
  dq = jnp.einsum("bqhgk,bkhd->bqhgd", ds, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bqhgk,bqhgd->bkhd", ds, q, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bqhgk,bqhgd->bkhd", p.astype(dout.dtype), dout,
                  preferred_element_type=jnp.float32)
  return dq, dk, dv


def _slice(x, i, size):
  return lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _add_slice(acc, update, i, size):
  return lax.dynamic_update_slice_in_dim(acc, _slice(acc, i, size) + update, i * size, axis=1)


def _block_forward(q, q_seg, q_pos, kv, carry, cfg: _Config):
  """Attend the local query block to one K/V block, merged into carry = (out, lse)."""
  k, v, kv_seg, kv_pos = kv
  cq, ck = cfg.q_chunk, cfg.kv_chunk

  def q_step(i, carry):
    qi, segi, posi = _slice(q, i, cq), _slice(q_seg, i, cq), _slice(q_pos, i, cq)

    def kv_step(j, acc):
      kvj = [_slice(x, j, ck) for x in (k, v, kv_seg, kv_pos)]
      compute = lambda acc: merge_partials(*acc, *_tile_forward(qi, *kvj[:2], segi, posi,
                                                                *kvj[2:], cfg))
      return lax.cond(may_attend(segi, posi, *kvj[2:], cfg.causal), compute, lambda a: a, acc)

    acc = (_slice(carry[0], i, cq), _slice(carry[1], i, cq))
    out_i, lse_i = lax.fori_loop(0, k.shape[1] // ck, kv_step, acc)
    return (lax.dynamic_update_slice_in_dim(carry[0], out_i, i * cq, axis=1),
            lax.dynamic_update_slice_in_dim(carry[1], lse_i, i * cq, axis=1))

  return lax.fori_loop(0, q.shape[1] // cq, q_step, carry)


def _block_backward(q, q_seg, q_pos, lse, dout, delta, kv, grads, cfg: _Config):
  """Accumulate the gradients of one (local queries, K/V block) pair into grads = (dq, dk, dv)."""
  k, v, kv_seg, kv_pos = kv
  cq, ck = cfg.q_chunk, cfg.kv_chunk

  def q_step(i, grads):
    qi, segi, posi = _slice(q, i, cq), _slice(q_seg, i, cq), _slice(q_pos, i, cq)
    lse_i, dout_i, delta_i = _slice(lse, i, cq), _slice(dout, i, cq), _slice(delta, i, cq)

    def kv_step(j, acc):
      kj, vj, segj, posj = [_slice(x, j, ck) for x in (k, v, kv_seg, kv_pos)]

      def compute(acc):
        tq, tk, tv = _tile_backward(qi, kj, vj, segi, posi, segj, posj, lse_i, dout_i, delta_i,
                                    cfg)
        return acc[0] + tq, _add_slice(acc[1], tk, j, ck), _add_slice(acc[2], tv, j, ck)

      return lax.cond(may_attend(segi, posi, segj, posj, cfg.causal), compute, lambda a: a, acc)

    dq, dk, dv = grads
    dq_i, dk, dv = lax.fori_loop(0, k.shape[1] // ck, kv_step,
                                 (jnp.zeros_like(qi, jnp.float32), dk, dv))
    return _add_slice(dq, dq_i, i, cq), dk, dv

  return lax.fori_loop(0, q.shape[1] // cq, q_step, grads)


def _rotate(xs, cfg: _Config):
  """Send every array to the next device on the ring (shard i -> i + 1)."""
  perm = [(i, (i + 1) % cfg.num_shards) for i in range(cfg.num_shards)]
  return tuple(lax.ppermute(x, cfg.axis_name, perm) for x in xs)


def _if_visible(q_seg, q_pos, kv, fn, carry, cfg: _Config):
  """Run fn(carry) only if the K/V block can be seen by some local query (block skipping)."""
  return lax.cond(may_attend(q_seg, q_pos, kv[2], kv[3], cfg.causal), fn, lambda c: c, carry)


def _ring_forward(q, k, v, q_seg, q_pos, kv_seg, kv_pos, cfg: _Config):
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, s, hkv, hq // hkv, d)
  # *_like keeps the varying-over-mesh-axes type that shard_map checks on loop carries.
  carry = (jnp.zeros_like(qg, jnp.float32),
           jnp.full_like(qg, -jnp.inf, jnp.float32, shape=qg.shape[:-1]))

  def step(kv, carry):
    block = functools.partial(_block_forward, qg, q_seg, q_pos, kv, cfg=cfg)
    return _if_visible(q_seg, q_pos, kv, block, carry, cfg)

  def ring_step(_, state):
    kv, carry = state
    next_kv = _rotate(kv, cfg)  # issued first so the transfer overlaps the compute
    return next_kv, step(kv, carry)

  kv = (k, v, kv_seg, kv_pos)
  if cfg.num_shards > 1:
    kv, carry = lax.fori_loop(0, cfg.num_shards - 1, ring_step, (kv, carry))
  out, lse = step(kv, carry)
  return out.reshape(q.shape).astype(q.dtype), lse


def _ring_backward(q, k, v, q_seg, q_pos, kv_seg, kv_pos, out, lse, dout, cfg: _Config):
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  group = lambda x: x.reshape(b, s, hkv, hq // hkv, d)
  qg, dout = group(q), group(dout.astype(q.dtype))
  delta = jnp.sum(dout.astype(jnp.float32) * group(out).astype(jnp.float32), axis=-1)
  grads = (jnp.zeros_like(qg, jnp.float32), jnp.zeros_like(k, jnp.float32),
           jnp.zeros_like(v, jnp.float32))

  def step(kv, grads):
    block = functools.partial(_block_backward, qg, q_seg, q_pos, lse, dout, delta, kv, cfg=cfg)
    return _if_visible(q_seg, q_pos, kv, block, grads, cfg)

  def ring_step(_, state):
    # dK/dV travel with their K/V block; after a full turn they are back at the owner.
    kv, grads = state
    next_kv = _rotate(kv, cfg)  # overlaps the compute; dK/dV can only leave after it
    dq, dk, dv = step(kv, grads)
    return next_kv, (dq, *_rotate((dk, dv), cfg))

  kv = (k, v, kv_seg, kv_pos)
  if cfg.num_shards > 1:
    kv, grads = lax.fori_loop(0, cfg.num_shards - 1, ring_step, (kv, grads))
  dq, dk, dv = step(kv, grads)
  if cfg.num_shards > 1:
    dk, dv = _rotate((dk, dv), cfg)
  return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention_core(q, k, v, q_seg, q_pos, kv_seg, kv_pos, cfg: _Config):
  return _ring_forward(q, k, v, q_seg, q_pos, kv_seg, kv_pos, cfg)[0]


def _core_fwd(q, k, v, q_seg, q_pos, kv_seg, kv_pos, cfg):
  out, lse = _ring_forward(q, k, v, q_seg, q_pos, kv_seg, kv_pos, cfg)
  return out, (q, k, v, q_seg, q_pos, kv_seg, kv_pos, out, lse)


def _core_bwd(cfg, residuals, dout):
  q, k, v, q_seg, q_pos, kv_seg, kv_pos, out, lse = residuals
  dq, dk, dv = _ring_backward(q, k, v, q_seg, q_pos, kv_seg, kv_pos, out, lse, dout, cfg)
  return dq, dk, dv, None, None, None, None


_attention_core.defvjp(_core_fwd, _core_bwd)


def _pad_seq(x, length: int):
  """Pad axis 1 to `length` with zeros (segment id 0 = padding, masked everywhere)."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad) if length != x.shape[1] else x


def _local_attention(q, k, v, segment_ids, positions, cfg: _Config):
  """Chunk-aligned call of the core on this device's block (padding to whole chunks)."""
  s = q.shape[1]
  cq, ck = min(cfg.q_chunk, s), min(cfg.kv_chunk, s)
  sq, sk = -(-s // cq) * cq, -(-s // ck) * ck
  cfg = cfg._replace(q_chunk=cq, kv_chunk=ck)
  out = _attention_core(_pad_seq(q, sq), _pad_seq(k, sk), _pad_seq(v, sk),
                        _pad_seq(segment_ids, sq), _pad_seq(positions, sq),
                        _pad_seq(segment_ids, sk), _pad_seq(positions, sk), cfg)
  return out[:, :s]


def _check_shapes(q, k, v, segment_ids, positions):
  if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k/v {k.shape}/{v.shape} must be [B,S,H,D] with the same "
                     "batch, length and head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
  if segment_ids.shape != q.shape[:2] or positions.shape != q.shape[:2]:
    raise ValueError(f"segment_ids {segment_ids.shape} and positions {positions.shape} must be "
                     f"[B, S] = {q.shape[:2]}")


def blockwise_attention(q, k, v, segment_ids, positions, *, causal: bool = True,
                        scale: float | None = None, q_chunk: int = DEFAULT_Q_CHUNK,
                        kv_chunk: int = DEFAULT_KV_CHUNK):
  """Single-device attention with the ring's chunked kernel (no S x S matrix) -> [B,S,Hq,D]."""
  _check_shapes(q, k, v, segment_ids, positions)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  cfg = _Config(None, 1, causal, scale, q_chunk, kv_chunk)
  return _local_attention(q, k, v, segment_ids.astype(jnp.int32), positions.astype(jnp.int32),
                          cfg)


def _divisible_axes(mesh, names, size):
  """Mesh axes among `names` (size > 1) whose running product divides `size`."""
  kept, total = [], 1
  for name in names:
    n = mesh.shape.get(name, 1)
    if n > 1 and size % (total * n) == 0:
      kept.append(name)
      total *= n
  return tuple(kept)


def ring_attention(q, k, v, segment_ids, positions, *, mesh: jax.sharding.Mesh,
                   axis: str = "seq", causal: bool = True, scale: float | None = None,
                   q_chunk: int = DEFAULT_Q_CHUNK, kv_chunk: int = DEFAULT_KV_CHUNK):
  """Exact attention with S sharded over mesh axis `axis` -> [B, S, Hq, D], same sharding.

  Batch is also sharded over ("data", "fsdp") and heads over "tensor" where those mesh axes
  exist, are > 1 and divide the dimension; otherwise those dimensions are replicated.
  """
  _check_shapes(q, k, v, segment_ids, positions)
  num_shards = mesh.shape.get(axis, 1)
  if q.shape[1] % num_shards:
    fixed = -(-q.shape[1] // num_shards) * num_shards
    raise ValueError(f"sequence length {q.shape[1]} is not divisible by the {num_shards} "
                     f"shards of mesh axis {axis!r}; pad it to {fixed}")
  batch_axes = _divisible_axes(mesh, [a for a in ("data", "fsdp") if a != axis], q.shape[0])
  head_axes = _divisible_axes(mesh, [a for a in ("tensor",) if a != axis], k.shape[2])
  batch = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
  heads = head_axes[0] if head_axes else None
  x_spec, id_spec = P(batch, axis, heads, None), P(batch, axis)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  cfg = _Config(axis, num_shards, causal, scale, q_chunk, kv_chunk)
  fn = jax.shard_map(functools.partial(_local_attention, cfg=cfg), mesh=mesh,
                     in_specs=(x_spec, x_spec, x_spec, id_spec, id_spec), out_specs=x_spec,
                     check_vma=True)
  return fn(q, k, v, segment_ids.astype(jnp.int32), positions.astype(jnp.int32))
