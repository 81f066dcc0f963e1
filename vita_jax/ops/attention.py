"""The attention models call, with the mask given by segment ids and positions (see
vita_jax.ops.dense for the rule and the dense reference, re-exported here).

`attention` picks the ring (sequence sharded over a mesh axis) or a local kernel (by default
the ring's chunked kernel on one device; `impl=` selects `jax.nn.dot_product_attention` or a
registered kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vita_jax.ops.dense import attention_mask, dot_product_attention
from vita_jax.ops.ring_attention import (
  BLOCK_KERNELS,
  DEFAULT_KV_CHUNK,
  DEFAULT_Q_CHUNK,
  blockwise_attention,
  ring_attention,
)

__all__ = ["attention", "attention_mask", "auto_impl", "dot_product_attention",
           "register_kernel"]


def _blockwise(impl: str):
  """The ring's block kernel `impl` run on one device (no ring axis)."""

  def kernel(q, k, v, segment_ids, positions, *, causal, scale, q_chunk, kv_chunk):
    return blockwise_attention(q, k, v, segment_ids, positions, causal=causal, scale=scale,
                               q_chunk=q_chunk or DEFAULT_Q_CHUNK,
                               kv_chunk=kv_chunk or DEFAULT_KV_CHUNK, impl=impl)

  return kernel


def _dense(q, k, v, segment_ids, positions, *, causal, scale, q_chunk, kv_chunk):
  del q_chunk, kv_chunk
  return dot_product_attention(q, k, v, segment_ids, positions, causal=causal, scale=scale)


def _jax_nn(implementation: str):
  """`jax.nn.dot_product_attention` (XLA or cuDNN flash) with our segment/position mask."""

  def kernel(q, k, v, segment_ids, positions, *, causal, scale, q_chunk, kv_chunk):
    del q_chunk, kv_chunk
    mask = attention_mask(segment_ids, positions, segment_ids, positions, causal)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                       implementation=implementation)
    # jax.nn averages V over a fully masked row; our contract is zeros there.
    return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)

  return kernel


# name -> kernel(q, k, v, segment_ids, positions, *, causal, scale, q_chunk, kv_chunk).
# "jnp" (default) is the chunked kernel the ring uses, runs everywhere, never builds [S, S];
# "pallas" is the ring's Pallas block kernel (interpret mode on CPU).
LOCAL_KERNELS = {"jnp": _blockwise("jnp"), "pallas": _blockwise("pallas"), "dense": _dense,
                 "xla": _jax_nn("xla"), "cudnn": _jax_nn("cudnn")}


def register_kernel(name: str, kernel) -> None:
  """Plug in a single-device kernel (e.g. a Pallas flash attention on TPU) under `impl=name`."""
  LOCAL_KERNELS[name] = kernel


def auto_impl(mesh: jax.sharding.Mesh | None = None) -> str:
  """What `impl="auto"` runs on the platform of `mesh` (else of the default devices): the
  portable chunked kernel "jnp" on CPU, where the Pallas kernels only interpret; the fused
  Pallas block kernel on GPU and TPU, the one fused kernel that also runs inside the ring."""
  platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
  return "jnp" if platform == "cpu" else "pallas"


def attention(q, k, v, segment_ids, positions, *, mesh: jax.sharding.Mesh | None = None,
              axis: str = "seq", causal: bool = True, scale: float | None = None,
              q_chunk: int | None = None, kv_chunk: int | None = None, impl: str = "jnp"):
  """The attention models call: q [B,S,Hq,D], k/v [B,S,Hkv,D] -> [B,S,Hq,D].

  With `mesh` whose `axis` has more than one device the sequence is sharded and the ring runs
  with `impl` as its block kernel when it is one (BLOCK_KERNELS: "jnp", "pallas"), else with
  "jnp" (the other kernels return no LSE to merge); on other multi-device meshes a block kernel
  runs per device inside the same shard_map. Otherwise `impl` picks the local kernel from
  LOCAL_KERNELS: "jnp" (chunked, default), "pallas" (the Pallas block kernel), "dense" (the
  reference), "xla" or "cudnn" (`jax.nn.dot_product_attention`; they build the [S, S] mask, so
  short sequences only). "auto" is resolved first by `auto_impl` ("jnp" on CPU, "pallas" on GPU
  and TPU).
  """
  if impl == "auto":
    impl = auto_impl(mesh)
  if impl not in LOCAL_KERNELS:
    raise ValueError(f"attention impl={impl!r} is unknown; use one of {sorted(LOCAL_KERNELS)} "
                     "or register one with vita_jax.ops.attention.register_kernel")
  if mesh is not None and axis in mesh.shape and (mesh.shape[axis] > 1 or
                                                   (mesh.size > 1 and impl in BLOCK_KERNELS)):
    # On a multi-device mesh without sequence sharding this is the ring with one shard:
    # the same kernel, run per device on its batch/head shard.
    return ring_attention(q, k, v, segment_ids, positions, mesh=mesh, axis=axis, causal=causal,
                          scale=scale, q_chunk=q_chunk or DEFAULT_Q_CHUNK,
                          kv_chunk=kv_chunk or DEFAULT_KV_CHUNK,
                          impl=impl if impl in BLOCK_KERNELS else "jnp")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return LOCAL_KERNELS[impl](q, k, v, segment_ids, positions, causal=causal, scale=scale,
                             q_chunk=q_chunk, kv_chunk=kv_chunk)
