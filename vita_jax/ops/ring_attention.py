"""Ring attention: exact attention over a mesh-sharded sequence (docs/design.md#contracts).

Each device keeps its query block; key/value blocks travel around the ring with `ppermute`
together with their segment ids and positions, so the mask is right for any token layout
(contiguous, zigzag, packed). Each device keeps a running flash-style (acc, max, sum) in fp32.

The backward is a `custom_vjp` that keeps only the local q, k, v, output and log-sum-exp
(O(S / shards) per device), recomputes the scores tile by tile, and sends dK/dV around the ring
with their K/V block so they arrive back at the owner after a full turn.

Inside a block, work is split into q_chunk x kv_chunk tiles (so a 32K local block never builds a
32K x 32K score matrix). Each tile is skipped when the mask hides it entirely, computed without
any mask when it hides nothing (one segment, keys all in the past: most tiles of a long causal
sequence), and masked otherwise; decided from the tile's actual segment and position ranges
(`attention_tiles.tile_kinds`, all of a block's tiles at once). With no ring axis the same
kernel is the single-device attention (`blockwise_attention`).

Shapes: q [B, S, Hq, D], k/v [B, S, Hkv, D] with Hq a multiple of Hkv (GQA: query heads are
grouped per KV head, K/V are never repeated); segment_ids/positions int32 [B, S]. Internally
the layout is head-major: q [B, Hkv, G, S, D], kv = (k, v) each [B, Hkv, S, D], ids stacked as
[2, B, S] (segment ids, positions: one transfer per ring step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from vita_jax.ops.attention_tiles import (
  FULL,
  MASKED,
  SKIP,
  may_attend,
  merge_partials,
  tile_backward,
  tile_forward,
  tile_kinds,
)
from vita_jax.parallel.sharding import LOGICAL_RULES, logical_to_spec

DEFAULT_Q_CHUNK = 512
DEFAULT_KV_CHUNK = 512
_UNROLL_TILES = 16  # blocks of at most this many tiles are unrolled (no loop plumbing)


class _Config(NamedTuple):
  axis_name: str | None  # the ring axis inside shard_map; None = one device, no ring
  num_shards: int
  causal: bool
  scale: float
  q_chunk: int
  kv_chunk: int
  unroll: bool = False
  impl: str = "jnp"     # the block kernel (BLOCK_KERNELS) every ring step runs


def _cut(x, axis: int, i, size: int):
  return lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _rows(x, i, size: int):
  """Query tile i of a [B, H, G, S, ...] array as [B, H, G*size, ...] (groups stacked)."""
  t = _cut(x, 3, i, size)
  return t.reshape(*t.shape[:2], -1, *t.shape[4:])


def _put_rows(x, tile, i, size: int):
  """Inverse of _rows: write tile [B, H, G*size, ...] back into x [B, H, G, S, ...]."""
  tile = tile.reshape(*x.shape[:3], size, *x.shape[4:])
  return lax.dynamic_update_slice_in_dim(x, tile, i * size, axis=3)


def _loop(n: int, body, init, cfg: _Config):
  return lax.fori_loop(0, n, body, init, unroll=True if cfg.unroll else 1)


def _switch(kind, compute, carry):
  """compute(masked: bool, carry) on a tile of the given kind; SKIP returns carry unchanged."""
  branches = [None] * 3
  branches[SKIP] = lambda c: c
  branches[FULL] = functools.partial(compute, False)
  branches[MASKED] = functools.partial(compute, True)
  return lax.switch(kind, branches, carry)


def _block_forward(qh, q_ids, kv, kv_ids, state, cfg: _Config):
  """Attend the local queries qh [B,H,G,Sq,D] to one K/V block kv = (k, v) [B,H,Sk,D]; state =
  (acc [B,H,G,Sq,D], max, sum [B,H,G,Sq]) fp32."""
  cq, ck = cfg.q_chunk, cfg.kv_chunk
  tile = functools.partial(tile_forward, causal=cfg.causal, scale=cfg.scale,
                           groups=qh.shape[2])

  kinds = tile_kinds(q_ids, kv_ids, cq, ck, cfg.causal)

  def q_step(i, state):
    q_i, qid_i = _rows(qh, i, cq), _cut(q_ids, 2, i, cq)

    def kv_step(j, st):
      k_j, v_j = (_cut(x, 2, j, ck) for x in kv)
      kid_j = _cut(kv_ids, 2, j, ck)
      ids = (qid_i[0], qid_i[1], kid_j[0], kid_j[1])
      compute = lambda masked, st: tile(q_i, k_j, v_j, ids, st, masked=masked)
      return _switch(kinds[i, j], compute, st)

    st = _loop(kv[0].shape[2] // ck, kv_step, tuple(_rows(x, i, cq) for x in state), cfg)
    return tuple(_put_rows(x, t, i, cq) for x, t in zip(state, st))

  return _loop(qh.shape[3] // cq, q_step, state, cfg)


def _block_backward(qh, q_ids, dout, lse, delta, kv, kv_ids, grads, cfg: _Config):
  """Accumulate one (local queries, K/V block) pair into grads = (dq_t [B,H,D,G,Sq],
  (dk, dv) [B,H,Sk,D]) fp32, unscaled (see tile_backward)."""
  cq, ck = cfg.q_chunk, cfg.kv_chunk
  tile = functools.partial(tile_backward, causal=cfg.causal, scale=cfg.scale,
                           groups=qh.shape[2])
  k_t = jnp.swapaxes(kv[0], -1, -2)                                # [B, H, D, Sk]
  kinds = tile_kinds(q_ids, kv_ids, cq, ck, cfg.causal)

  def kv_step(j, grads):
    k_j, v_j = (_cut(x, 2, j, ck) for x in kv)
    kt_j = _cut(k_t, 3, j, ck)
    kid_j = _cut(kv_ids, 2, j, ck)

    def q_step(i, acc):
      qid_i = _cut(q_ids, 2, i, cq)
      ids = (qid_i[0], qid_i[1], kid_j[0], kid_j[1])
      q_i = _rows(qh, i, cq)

      def compute(masked, _):
        rows = [_rows(x, i, cq) for x in (dout, lse, delta)]
        return tile(q_i, k_j, kt_j, v_j, *rows, ids, masked=masked)

      # The branches return contributions (zeros when skipped), so the accumulators stay out
      # of the conditional and are updated in place.
      b, h, m, d = q_i.shape
      zeros = (jnp.zeros_like(q_i, jnp.float32, shape=(b, h, d, m)),
               jnp.zeros_like(v_j, jnp.float32), jnp.zeros_like(v_j, jnp.float32))
      tq, tk, tv = _switch(kinds[i, j], compute, zeros)
      dq_t, dk, dv = acc
      tq = tq.reshape(*tq.shape[:2], tq.shape[2], -1, cq)          # [B, H, D, G, cq]
      dq_t = lax.dynamic_update_slice_in_dim(dq_t, _cut(dq_t, 4, i, cq) + tq, i * cq, axis=4)
      return dq_t, dk + tk, dv + tv

    dq_t, dkv = grads
    zeros = jnp.zeros_like(v_j, jnp.float32)
    dq_t, *dkv_j = _loop(qh.shape[3] // cq, q_step, (dq_t, zeros, zeros), cfg)
    dkv = tuple(lax.dynamic_update_slice_in_dim(acc, _cut(acc, 2, j, ck) + t, j * ck, axis=2)
                for acc, t in zip(dkv, dkv_j))
    return dq_t, dkv

  return _loop(kv[0].shape[2] // ck, kv_step, grads, cfg)


class BlockKernel(NamedTuple):
  """The per-step attention of the ring and of the single-device path (one interface, several
  implementations, so a fused kernel serves both):

  forward(qh, q_ids, k, v, kv_ids, cfg) -> (out fp32 [B,H,G,Sq,D], lse fp32 [B,H,G,Sq]):
    the normalised softmax of the query block qh [B,H,G,Sq,D] over the K/V block k/v
    [B,H,Sk,D] (GQA: G query heads per KV head, K/V never repeated), natural-log LSE, -inf and
    zeros for rows that see nothing. q_ids/kv_ids [2,B,S] = (segment ids, positions), so zigzag
    and packed layouts mask right; blocks merge exactly with merge_partials.
  backward(qh, q_ids, k, v, kv_ids, dout, lse, delta, cfg) -> (dq, dk, dv) fp32: this pair's
    share of the gradients given the *global* lse (finite; 0 for rows that see nothing) and
    delta = rowsum(dout * out), as in flash attention / ring-flash-attention.
  cfg supplies causal, scale and the tile sizes q_chunk / kv_chunk (dividing Sq / Sk).
  """
  forward: Callable
  backward: Callable


def _jnp_forward(qh, q_ids, k, v, kv_ids, cfg: _Config):
  stat = jnp.zeros_like(qh, jnp.float32, shape=qh.shape[:-1])
  state = (jnp.zeros_like(qh, jnp.float32), stat - jnp.inf, stat)
  acc, row_max, row_sum = _block_forward(qh, q_ids, (k, v), kv_ids, state, cfg)
  seen = row_sum > 0
  out = acc / jnp.where(seen, row_sum, 1.0)[..., None]
  return out, jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)


def _jnp_backward(qh, q_ids, k, v, kv_ids, dout, lse, delta, cfg: _Config):
  b, h, g, sq, d = qh.shape
  grads = (jnp.zeros_like(qh, jnp.float32, shape=(b, h, d, g, sq)),
           (jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32)))
  dq_t, (dk, dv) = _block_backward(qh, q_ids, dout, lse, delta, (k, v), kv_ids, grads, cfg)
  return (dq_t * cfg.scale).transpose(0, 1, 3, 4, 2), dk * cfg.scale, dv


def _pallas_forward(qh, q_ids, k, v, kv_ids, cfg: _Config):
  from vita_jax.ops import pallas_attention as pa  # deferred: Pallas is only loaded when used
  return pa.block_forward(qh, q_ids, k, v, kv_ids, causal=cfg.causal, scale=cfg.scale,
                          block_q=cfg.q_chunk, block_k=cfg.kv_chunk)


def _pallas_backward(qh, q_ids, k, v, kv_ids, dout, lse, delta, cfg: _Config):
  from vita_jax.ops import pallas_attention as pa
  return pa.block_backward(qh, q_ids, k, v, kv_ids, dout, lse, delta, causal=cfg.causal,
                           scale=cfg.scale, block_q=cfg.q_chunk, block_k=cfg.kv_chunk)


# impl name -> BlockKernel.
BLOCK_KERNELS: dict[str, BlockKernel] = {
  "jnp": BlockKernel(_jnp_forward, _jnp_backward),          # the chunked jnp tiles, everywhere
  "pallas": BlockKernel(_pallas_forward, _pallas_backward),  # vita_jax.ops.pallas_attention
}


def block_kernel(impl: str) -> BlockKernel:
  """The BlockKernel registered as `impl` (a ValueError naming the choices otherwise)."""
  if impl not in BLOCK_KERNELS:
    raise ValueError(f"block attention impl={impl!r} is unknown; use one of "
                     f"{sorted(BLOCK_KERNELS)}")
  return BLOCK_KERNELS[impl]


def _rotate(xs, cfg: _Config):
  """Send every array to the next device on the ring (shard i -> i + 1)."""
  perm = [(i, (i + 1) % cfg.num_shards) for i in range(cfg.num_shards)]
  return tuple(lax.ppermute(x, cfg.axis_name, perm) for x in xs)


def _if_visible(q_ids, kv_ids, fn, carry, cfg: _Config):
  """Run fn(carry) only if the K/V block can be seen by some local query (block skipping)."""
  visible = may_attend(q_ids[0], q_ids[1], kv_ids[0], kv_ids[1], cfg.causal)
  return lax.cond(visible, fn, lambda c: c, carry)


def _ring(step, kv, kv_ids, carry, cfg: _Config, rotate_carry: bool = False):
  """Run step(kv, kv_ids, carry) on every K/V block of the ring; with rotate_carry the carry's
  last entry (a tuple of arrays) travels with the blocks (and ends back home after a full turn)."""
  def ring_step(_, state):
    kv, kv_ids, carry = state
    *next_kv, next_ids = _rotate((*kv, kv_ids), cfg)  # first: the transfer overlaps the compute
    carry = step(kv, kv_ids, carry)
    if rotate_carry:
      carry = (*carry[:-1], _rotate(carry[-1], cfg))
    return tuple(next_kv), next_ids, carry

  if cfg.num_shards > 1:
    kv, kv_ids, carry = lax.fori_loop(0, cfg.num_shards - 1, ring_step, (kv, kv_ids, carry))
  carry = step(kv, kv_ids, carry)
  if rotate_carry and cfg.num_shards > 1:
    carry = (*carry[:-1], _rotate(carry[-1], cfg))
  return carry


def _ring_forward(qh, kv, ids, cfg: _Config):
  """-> (out [B,H,G,S,D] in q's dtype, lse [B,H,G,S] fp32, -inf where nothing is visible).

  Each ring step's block result (out_i, lse_i) is merged into the running (out, lse) in fp32
  (merge_partials), whatever block kernel produced it."""
  kernel = block_kernel(cfg.impl)
  # *_like keeps the varying-over-mesh-axes type that shard_map checks on loop carries.
  state = (jnp.zeros_like(qh, jnp.float32),
           jnp.zeros_like(qh, jnp.float32, shape=qh.shape[:-1]) - jnp.inf)

  def step(kv, kv_ids, state):
    def block(state):
      return merge_partials(*state, *kernel.forward(qh, ids, *kv, kv_ids, cfg))
    return _if_visible(ids, kv_ids, block, state, cfg)

  out, lse = _ring(step, kv, ids, state, cfg)
  return out.astype(qh.dtype), lse


def _ring_backward(qh, kv, ids, out, lse, dout, cfg: _Config):
  kernel = block_kernel(cfg.impl)
  dout = dout.astype(qh.dtype)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  lse = jnp.where(jnp.isneginf(lse), 0.0, lse)   # such rows have every key masked
  grads = (jnp.zeros_like(qh, jnp.float32), tuple(jnp.zeros_like(x, jnp.float32) for x in kv))

  def step(kv, kv_ids, grads):
    def block(grads):
      dq, dk, dv = kernel.backward(qh, ids, *kv, kv_ids, dout, lse, delta, cfg)
      return grads[0] + dq, (grads[1][0] + dk, grads[1][1] + dv)
    return _if_visible(ids, kv_ids, block, grads, cfg)

  dq, (dk, dv) = _ring(step, kv, ids, grads, cfg, rotate_carry=True)
  return dq.astype(qh.dtype), dk.astype(kv[0].dtype), dv.astype(kv[1].dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(qh, k, v, ids, cfg: _Config):
  """qh [B,H,G,S,D], k/v [B,H,S,D], ids [2,B,S] (segment ids, positions) -> out like qh."""
  return _ring_forward(qh, (k, v), ids, cfg)[0]


def _core_fwd(qh, k, v, ids, cfg):
  # Under a layer scan and grad, JAX hoists whatever depends only on the scan's constants out of
  # the loop: the ids are such a constant, and every tile's mask (with the tile loops split
  # around it) would be computed once and stored for all tiles, [q tiles, kv tiles, ..., cq, ck]
  # - the S x S matrix the tiles exist to avoid. Tying the ids to one query element (a barrier
  # XLA cannot see through) keeps the masks inside the tile loops, one tile at a time
  # (tests/test_attention.py checks the memory); the tile kinds stay cheap (`tile_kinds`).
  ids = lax.optimization_barrier((ids, qh[0, 0, 0, 0, :1]))[0]
  out, lse = _ring_forward(qh, (k, v), ids, cfg)
  return out, (qh, k, v, ids, out, lse)


def _core_bwd(cfg, residuals, dout):
  qh, k, v, ids, out, lse = residuals
  return (*_ring_backward(qh, (k, v), ids, out, lse, dout, cfg), None)


_attention_core.defvjp(_core_fwd, _core_bwd)


def _pad_seq(x, length: int):
  """Pad axis 1 to `length` with zeros (segment id 0 = padding, masked everywhere)."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad) if length != x.shape[1] else x


def _local_attention(q, k, v, segment_ids, positions, cfg: _Config):
  """This device's block: pad to whole tiles, go head-major, run the core, come back."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  cq, ck = min(cfg.q_chunk, s), min(cfg.kv_chunk, s)
  whole = math.lcm(cq, ck)                 # q and kv share one padded length (one ids array)
  padded = -(-s // whole) * whole
  tiles = (padded // cq) * (padded // ck)
  cfg = cfg._replace(q_chunk=cq, kv_chunk=ck, unroll=tiles <= _UNROLL_TILES)
  qh = _pad_seq(q, padded).reshape(b, padded, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)
  kh, vh = (_pad_seq(x, padded).transpose(0, 2, 1, 3) for x in (k, v))
  ids = jnp.stack([_pad_seq(segment_ids, padded), _pad_seq(positions, padded)])
  out = _attention_core(qh, kh, vh, ids, cfg)                       # [B, Hkv, G, S, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, hq, d)[:, :s]


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
                        kv_chunk: int = DEFAULT_KV_CHUNK, impl: str = "jnp"):
  """Single-device attention with the ring's block kernel `impl` (no S x S matrix) ->
  [B,S,Hq,D]."""
  _check_shapes(q, k, v, segment_ids, positions)
  block_kernel(impl)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  cfg = _Config(None, 1, causal, scale, q_chunk, kv_chunk, impl=impl)
  return _local_attention(q, k, v, segment_ids.astype(jnp.int32), positions.astype(jnp.int32),
                          cfg)


def _ring_spec(mesh, axis: str, shape) -> P:
  """The [B, S, H, D] spec inside the ring: the sequence over `axis`, batch and KV heads as the
  sharding rules table places "batch" and "act_kv_heads" (without `axis`; a mesh axis that does
  not divide its dimension is left out, so that dimension is replicated)."""
  def without(physical):
    axes = (physical,) if isinstance(physical, str) else tuple(physical or ())
    return tuple(a for a in axes if a != axis)

  rules = tuple((name, axis if name == "length" else without(physical))
                for name, physical in LOGICAL_RULES)
  spec = logical_to_spec(("batch", "length", "act_kv_heads", None), mesh, shape, rules=rules)
  return P(spec[0], axis, spec[2], None)


def ring_attention(q, k, v, segment_ids, positions, *, mesh: jax.sharding.Mesh,
                   axis: str = "seq", causal: bool = True, scale: float | None = None,
                   q_chunk: int = DEFAULT_Q_CHUNK, kv_chunk: int = DEFAULT_KV_CHUNK,
                   impl: str = "jnp"):
  """Exact attention with S sharded over mesh axis `axis` -> [B, S, Hq, D], same sharding.

  Batch and heads are sharded as the rules table (vita_jax.parallel.sharding.LOGICAL_RULES)
  places "batch" and "act_kv_heads", where those mesh axes are > 1 and divide the dimension;
  otherwise those dimensions are replicated.
  """
  _check_shapes(q, k, v, segment_ids, positions)
  block_kernel(impl)
  num_shards = mesh.shape.get(axis, 1)
  if q.shape[1] % num_shards:
    fixed = -(-q.shape[1] // num_shards) * num_shards
    raise ValueError(f"sequence length {q.shape[1]} is not divisible by the {num_shards} "
                     f"shards of mesh axis {axis!r}; pad it to {fixed}")
  x_spec = _ring_spec(mesh, axis, k.shape)
  id_spec = P(x_spec[0], axis)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  cfg = _Config(axis, num_shards, causal, scale, q_chunk, kv_chunk, impl=impl)
  fn = jax.shard_map(functools.partial(_local_attention, cfg=cfg), mesh=mesh,
                     in_specs=(x_spec, x_spec, x_spec, id_spec, id_spec), out_specs=x_spec,
                     # Pallas interpret mode (JAX 0.10) loses the varying-axes type of its
                     # grid-loop carries and fails shard_map's check; skip the check there.
                     check_vma=impl != "pallas")
  return fn(q, k, v, segment_ids.astype(jnp.int32), positions.astype(jnp.int32))
