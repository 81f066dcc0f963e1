"""A Pallas implementation of the ring's block kernel (`vita_jax.ops.ring_attention.BlockKernel`).

Why Pallas: the jnp tiles leave the score matrix to XLA, which on GPU/TPU runs far below the
hardware; a Pallas kernel keeps each tile in on-chip memory. The same kernel runs
inside the ring and on one device, so long sequences get it too.

Layout (the ring's head-major one): q [B, Hkv, G, Sq, D], k/v [B, Hkv, Sk, D], ids int32
[B, S]. GQA: the grid runs over (B, Hkv, G, query tiles) and every group's program reads the
same K/V head through its BlockSpec, so K/V are never repeated in memory.

- forward: online softmax over the key tiles of the block -> (out fp32, natural-log lse fp32;
  -inf and zeros for rows that see nothing, e.g. padding with segment id 0).
- backward (flash-attention 2 scheme, given the *global* lse and delta = rowsum(dout * out)):
  one kernel for dq (grid over query tiles, loop over key tiles) and one for dk/dv (grid over
  key tiles, loop over groups and query tiles), so nothing is accumulated across programs.

On CPU the kernels run with `interpret=True` (that is how the tests exercise them); elsewhere
`pallas_call` lowers them for the backend (Triton on GPU, Mosaic on TPU). Those lowerings have
NOT been run yet: tile sizes must then suit the hardware (powers of two, >= 16 on GPU; TPU
wants the last two block dims divisible by (8, 128)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(q_seg, q_pos, kv_seg, kv_pos, causal: bool):
  """bool [tq, tk]: the project's rule (vita_jax.ops.dense.attention_mask) for one tile."""
  mask = (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] != 0)
  if causal:
    mask &= q_pos[:, None] >= kv_pos[None, :]
  return mask


def _out(shape, like):
  """An fp32 output shape that varies over the same mesh axes as `like` (shard_map's check)."""
  return jax.ShapeDtypeStruct(shape, jnp.float32,
                              manual_axis_type=getattr(jax.typeof(like), "mat", None))


def _interpret() -> bool:
  """Interpret mode where the computation runs on CPU (no Pallas lowering exists there)."""
  return jax.default_backend() == "cpu"


def _fwd_kernel(q_ref, qs_ref, qp_ref, k_ref, v_ref, ks_ref, kp_ref, o_ref, lse_ref, *,
                causal: bool, scale: float, block_k: int):
  q, q_seg, q_pos = q_ref[...], qs_ref[...], qp_ref[...]
  tq, d = q.shape

  def body(j, state):
    acc, row_max, row_sum = state
    sl = pl.ds(j * block_k, block_k)
    k, v = k_ref[sl, :], v_ref[sl, :]
    s = _dot(q, k, _NT) * scale
    s = jnp.where(_mask(q_seg, q_pos, ks_ref[sl], kp_ref[sl], causal), s, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    safe = jnp.where(jnp.isneginf(new_max), 0.0, new_max)     # rows that saw nothing yet
    p = jnp.exp(s - safe[:, None])
    corr = jnp.exp(row_max - safe)
    acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v)
    return acc, new_max, row_sum * corr + jnp.sum(p, axis=1)

  init = (jnp.zeros((tq, d), jnp.float32), jnp.full((tq,), -jnp.inf, jnp.float32),
          jnp.zeros((tq,), jnp.float32))
  acc, row_max, row_sum = lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
  seen = row_sum > 0
  total = jnp.where(seen, row_sum, 1.0)
  o_ref[...] = acc / total[:, None]
  lse_ref[...] = jnp.where(seen, row_max + jnp.log(total), -jnp.inf)


def _specs(sk, d, tq):
  """BlockSpecs shared by the forward and the dq kernel: grid (B, Hkv, G, Sq / tq)."""
  sq_ = pl.squeezed
  q = pl.BlockSpec((sq_, sq_, sq_, tq, d), lambda b, h, g, i: (b, h, g, i, 0))
  row = pl.BlockSpec((sq_, sq_, sq_, tq), lambda b, h, g, i: (b, h, g, i))
  q_ids = pl.BlockSpec((sq_, tq), lambda b, h, g, i: (b, i))
  kv = pl.BlockSpec((sq_, sq_, sk, d), lambda b, h, g, i: (b, h, 0, 0))
  kv_ids = pl.BlockSpec((sq_, sk), lambda b, h, g, i: (b, 0))
  return q, row, q_ids, kv, kv_ids


def block_forward(qh, q_ids, k, v, kv_ids, *, causal: bool, scale: float, block_q: int,
                  block_k: int):
  """qh [B,H,G,Sq,D] vs k/v [B,H,Sk,D]; ids = (segment ids, positions) each [B, S] ->
  (out fp32 [B,H,G,Sq,D], lse fp32 [B,H,G,Sq], natural log, -inf where nothing is visible)."""
  b, h, g, sq, d = qh.shape
  sk = k.shape[2]
  q_spec, row_spec, qid_spec, kv_spec, kvid_spec = _specs(sk, d, block_q)
  kernel = functools.partial(_fwd_kernel, causal=causal, scale=scale, block_k=block_k)
  return pl.pallas_call(
      kernel, grid=(b, h, g, sq // block_q),
      in_specs=[q_spec, qid_spec, qid_spec, kv_spec, kv_spec, kvid_spec, kvid_spec],
      out_specs=[q_spec, row_spec],
      out_shape=[_out(qh.shape, qh), _out(qh.shape[:-1], qh)],
      interpret=_interpret(), name="vita_attention_fwd",
  )(qh, *q_ids, k, v, *kv_ids)


def _probs_and_ds(q, k, v, dout, lse, delta, mask, scale: float):
  """A tile's probabilities from the global lse and dS = P * (dout V^T - delta), both [tq, tk]
  fp32 (zeros where masked): what the dq and the dk/dv kernels both need."""
  p = jnp.where(mask, jnp.exp(_dot(q, k, _NT) * scale - lse[:, None]), 0.0)
  return p, p * (_dot(dout, v, _NT) - delta[:, None])


def _dq_kernel(q_ref, do_ref, lse_ref, dl_ref, qs_ref, qp_ref, k_ref, v_ref, ks_ref, kp_ref,
               dq_ref, *, causal: bool, scale: float, block_k: int):
  q, dout, lse, delta = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]
  q_seg, q_pos = qs_ref[...], qp_ref[...]

  def body(j, dq):
    sl = pl.ds(j * block_k, block_k)
    k, v = k_ref[sl, :], v_ref[sl, :]
    mask = _mask(q_seg, q_pos, ks_ref[sl], kp_ref[sl], causal)
    _, ds = _probs_and_ds(q, k, v, dout, lse, delta, mask, scale)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, k_ref.shape[0] // block_k, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq * scale


def _dkv_kernel(q_ref, do_ref, lse_ref, dl_ref, qs_ref, qp_ref, k_ref, v_ref, ks_ref, kp_ref,
                dk_ref, dv_ref, *, causal: bool, scale: float, block_q: int):
  k, v, kv_seg, kv_pos = k_ref[...], v_ref[...], ks_ref[...], kp_ref[...]
  groups, sq = q_ref.shape[0], q_ref.shape[1]
  tiles = sq // block_q

  def body(t, grads):
    dk, dv = grads
    grp, sl = t // tiles, pl.ds((t % tiles) * block_q, block_q)
    q, dout = q_ref[grp, sl, :], do_ref[grp, sl, :]
    lse, delta = lse_ref[grp, sl], dl_ref[grp, sl]
    mask = _mask(qs_ref[sl], qp_ref[sl], kv_seg, kv_pos, causal)          # [tq, tk]
    p, ds = _probs_and_ds(q, k, v, dout, lse, delta, mask, scale)
    dv = dv + _dot(p.astype(dout.dtype), dout, _TN)
    dk = dk + _dot(ds.astype(q.dtype), q, _TN)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups * tiles, body, (zeros, zeros))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def block_backward(qh, q_ids, k, v, kv_ids, dout, lse, delta, *, causal: bool, scale: float,
                   block_q: int, block_k: int):
  """Gradients of one (query block, K/V block) pair given the global softmax statistics:
  dout like qh, lse/delta fp32 [B,H,G,Sq] (lse finite: 0 where a row sees nothing) ->
  (dq [B,H,G,Sq,D], dk, dv [B,H,Sk,D]) all fp32."""
  b, h, g, sq, d = qh.shape
  sk = k.shape[2]
  interpret = _interpret()
  q_spec, row_spec, qid_spec, kv_spec, kvid_spec = _specs(sk, d, block_q)
  args = (qh, dout, lse, delta, *q_ids, k, v, *kv_ids)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, causal=causal, scale=scale, block_k=block_k),
      grid=(b, h, g, sq // block_q),
      in_specs=[q_spec, q_spec, row_spec, row_spec, qid_spec, qid_spec, kv_spec, kv_spec,
                kvid_spec, kvid_spec],
      out_specs=q_spec, out_shape=_out(qh.shape, qh),
      interpret=interpret, name="vita_attention_dq",
  )(*args)

  sqz = pl.squeezed
  q_all = pl.BlockSpec((sqz, sqz, g, sq, d), lambda b, h, j: (b, h, 0, 0, 0))
  rows_all = pl.BlockSpec((sqz, sqz, g, sq), lambda b, h, j: (b, h, 0, 0))
  qid_all = pl.BlockSpec((sqz, sq), lambda b, h, j: (b, 0))
  kv_tile = pl.BlockSpec((sqz, sqz, block_k, d), lambda b, h, j: (b, h, j, 0))
  kvid_tile = pl.BlockSpec((sqz, block_k), lambda b, h, j: (b, j))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, causal=causal, scale=scale, block_q=block_q),
      grid=(b, h, sk // block_k),
      in_specs=[q_all, q_all, rows_all, rows_all, qid_all, qid_all, kv_tile, kv_tile,
                kvid_tile, kvid_tile],
      out_specs=[kv_tile, kv_tile],
      out_shape=[_out(k.shape, k)] * 2,
      interpret=interpret, name="vita_attention_dkv",
  )(*args)
  return dq, dk, dv
