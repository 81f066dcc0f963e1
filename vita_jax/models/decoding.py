"""The jitted model steps of generation (docs/design.md#contracts); vita_jax.generate drives them.

`prefill_step` runs the prompt (zigzag layout, sharded over `seq`) and keeps every layer's K/V
where it was computed: the cache is [layers, B, S, Hkv, hd] sharded over `seq`, with the
positions and segment ids that say which token each row is. `decode_step` feeds one token: it
attends to that sharded cache and to a small replicated buffer of the generated tokens' K/V
(vita_jax.ops.cache_attention). All shapes are fixed per bucket, so one compilation serves
every step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from vita_jax.models.common import exact_in_fp32_step, rms_norm
from vita_jax.models.llm import layer_finish, layer_qkv, rope_tables
from vita_jax.models.vlm import merge_visual_features
from vita_jax.ops.attention import attention
from vita_jax.ops.cache_attention import decode_attention
from vita_jax.ops.lm_head import select_logits
from vita_jax.parallel.sharding import constrain

ACT = ("batch", "length", "act_embed")
KV = ("batch", "length", None, None)


class Cache(NamedTuple):
  k: jax.Array              # [L, B, S, Hkv, hd] prompt keys, zigzag order, sharded over seq
  v: jax.Array
  segment_ids: jax.Array    # [B, S] int32 (0 = padding)
  positions: jax.Array      # [B, S] int32
  new_k: jax.Array          # [L, B, N, Hkv, hd] generated tokens' keys, replicated
  new_v: jax.Array


class Decoding(NamedTuple):
  """The loop carry: everything a decode step reads and writes."""
  cache: Cache
  tokens: jax.Array         # [B, N] int32 generated so far (pad after EOS)
  count: jax.Array          # scalar int32: tokens generated so far
  limit: jax.Array          # scalar int32: max_new_tokens
  prompt_len: jax.Array     # [B] int32: each row's prompt length, the position of its first
                            # new token (a scalar: every row's)
  done: jax.Array           # [B] bool: row has produced EOS
  key: jax.Array


class Sampling(NamedTuple):
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def sample(logits, key, sampling: Sampling):
  """logits [B, V] -> int32 [B]: greedy at temperature 0, else top-k / top-p sampling."""
  temperature, top_k, top_p = sampling
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always the most likely token).
    drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@exact_in_fp32_step
def prefill_step(graphdef, state, ids, ctx_index, features, positions, segment_ids, last, *,
                 mesh, new_len):
  """Prompt (zigzag layout, [B, S]) -> (fp32 logits [B, V] at `last`, Cache)."""
  model = nnx.merge(graphdef, state)
  llm, cfg = model.llm, model.llm.cfg
  eps = cfg.rms_norm_eps
  x = llm.embed(ids)
  if features is not None:
    x = merge_visual_features(x, ids, features, model.context_ids, check=False,
                              context_index=ctx_index)
  x = constrain(x, ACT, mesh)
  cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

  def body(x, p):
    q, k, v = layer_qkv(p, x, cos, sin, eps)
    o = attention(q, k, v, segment_ids, positions, mesh=mesh, causal=True, **llm.attention_cfg)
    return constrain(layer_finish(p, x, o, eps), ACT, mesh), (constrain(k, KV, mesh),
                                                              constrain(v, KV, mesh))

  x, (ks, vs) = lax.scan(body, x, llm.layer_params())
  hidden = rms_norm(x, llm.final_norm[...].astype(x.dtype), eps)
  logits = select_logits(hidden, model.lm_head_weight().astype(hidden.dtype), last, mesh=mesh)
  buffer = (cfg.num_layers, ids.shape[0], new_len, cfg.num_kv_heads, cfg.head_dim)
  cache = Cache(ks, vs, segment_ids, positions, jnp.zeros(buffer, ks.dtype),
                jnp.zeros(buffer, vs.dtype))
  return logits, cache


@exact_in_fp32_step
def decode_step(graphdef, state, st: Decoding, *, mesh, sampling, eos_id, pad_id):
  """Feed the last generated token, sample the next one."""
  model = nnx.merge(graphdef, state)
  llm, cfg = model.llm, model.llm.cfg
  eps, cache = cfg.rms_norm_eps, st.cache
  b, n = st.tokens.shape
  slot = st.count - 1                                   # buffer row of the token fed now
  token = lax.dynamic_index_in_dim(st.tokens, slot, axis=1)               # [B, 1]
  prompt_len = jnp.broadcast_to(st.prompt_len, (b,)).astype(jnp.int32)
  pos = (prompt_len + slot)[:, None]                    # [B, 1] each row at its own length
  one = jnp.ones((b, 1), jnp.int32)
  cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  buf_pos = prompt_len[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
  buf_seg = jnp.broadcast_to((jnp.arange(n) <= slot).astype(jnp.int32), (b, n))

  def body(x, layer):
    p, ck, cv, bk, bv = layer
    q, k, v = layer_qkv(p, x, cos, sin, eps)
    bk = lax.dynamic_update_slice_in_dim(bk, k, slot, axis=1)
    bv = lax.dynamic_update_slice_in_dim(bv, v, slot, axis=1)
    out = decode_attention(q, one, pos, (ck, cv, cache.segment_ids, cache.positions),
                           (bk, bv, buf_seg, buf_pos), mesh=mesh)
    return layer_finish(p, x, out.reshape(q.shape).astype(x.dtype), eps), (k, v)

  x = llm.embed(token)
  x, (ks, vs) = lax.scan(body, x, (llm.layer_params(), cache.k, cache.v, cache.new_k,
                                   cache.new_v))
  cache = cache._replace(new_k=lax.dynamic_update_slice_in_dim(cache.new_k, ks, slot, axis=2),
                         new_v=lax.dynamic_update_slice_in_dim(cache.new_v, vs, slot, axis=2))
  logits = llm.logits(rms_norm(x, llm.final_norm[...].astype(x.dtype), eps))[:, 0]
  nxt = sample(logits, jax.random.fold_in(st.key, st.count), sampling)
  nxt = jnp.where(st.done, pad_id, nxt)
  tokens = lax.dynamic_update_slice_in_dim(st.tokens, nxt[:, None], st.count, axis=1)
  return st._replace(cache=cache, tokens=tokens, count=st.count + 1,
                     done=st.done | (nxt == eos_id))


def _running(st: Decoding):
  return (st.count < st.limit) & ~jnp.all(st.done)


def decode_loop(graphdef, state, st: Decoding, **kw):
  """decode_step until max_new_tokens or every row has produced EOS (one lax.while_loop)."""
  return lax.while_loop(_running, functools.partial(decode_step, graphdef, state, **kw), st)


def first_token(logits, key, tokens, *, sampling, eos_id):
  """The first generated token from the prefill logits -> (tokens [B, N], done [B])."""
  first = sample(logits, jax.random.fold_in(key, 0), sampling)
  return tokens.at[:, 0].set(first), first == eos_id



# Continuous batching (vita_jax.serving.engine): a fixed pool of slots, each holding one request
# at its own length, sampling parameters and key, all advanced by one jitted step.


class Slots(NamedTuple):
  """The slot pool: a Cache of `max_batch` rows plus each row's decoding state.

  The prompt rows [L, B, S, Hkv, hd] are sharded over `seq`; a slot's prompt occupies the first
  bucket/shards rows of every shard's block (the rest are segment 0), so inserting a prefilled
  prompt moves no data between devices. Attention reads positions and segment ids, never the
  row order, so that layout needs nothing else.
  """
  cache: Cache
  last: jax.Array           # [B] int32: the token fed at the next step
  count: jax.Array          # [B] int32: tokens generated so far (the last one included)
  prompt_len: jax.Array     # [B] int32
  key: jax.Array            # [B, 2] uint32: the request's PRNGKey(seed)
  temperature: jax.Array    # [B] float32 (0 = greedy)
  top_k: jax.Array          # [B] int32 (0 = all)
  top_p: jax.Array          # [B] float32


def sample_rows(logits, keys, temperature, top_k, top_p):
  """`sample` with per-row parameters: logits [B, V], keys [B, 2], the rest [B] -> int32 [B].

  The same filters as `sample` (top-k, then the smallest top-p prefix of what is left), but
  traced values rather than static ones, so rows with different settings share one step.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    keep &= jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]
    kept = jnp.zeros_like(keep).at[jnp.arange(logits.shape[0])[:, None], order].set(keep)
    masked = jnp.where(kept, scaled, -jnp.inf)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  # The vocabulary sort is skipped when every row is greedy.
  return lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)


def empty_slots(cfg, batch: int, prompt_len: int, new_len: int, dtype, *, mesh) -> Slots:
  """A pool of `batch` free slots: prompt rows [L, B, prompt_len, Hkv, hd] sharded over seq,
  generated-token rows [L, B, new_len, Hkv, hd] replicated."""
  shape = (cfg.num_layers, batch, prompt_len, cfg.num_kv_heads, cfg.head_dim)
  kv = lambda: constrain(jnp.zeros(shape, dtype), (None,) + KV, mesh)
  ids = lambda: constrain(jnp.zeros((batch, prompt_len), jnp.int32), ("batch", "length"), mesh)
  buffer = shape[:2] + (new_len,) + shape[3:]
  cache = Cache(kv(), kv(), ids(), ids(), jnp.zeros(buffer, dtype), jnp.zeros(buffer, dtype))
  zeros = jnp.zeros((batch,), jnp.int32)
  return Slots(cache, zeros, zeros, zeros, jnp.zeros((batch, 2), jnp.uint32),
               jnp.zeros((batch,), jnp.float32), zeros, jnp.ones((batch,), jnp.float32))


def insert_slot(slots: Slots, slot, logits, cache: Cache, prompt_len, key, temperature, top_k,
                top_p, *, mesh, shards: int):
  """Put one prefilled request (`prefill_step`'s logits [1, V] and Cache) into row `slot`;
  sample its first token as `first_token` does -> (Slots, first token int32 [])."""
  pool = slots.cache

  def blocks(x, axis):          # [..., S, ...] -> [..., shards, S / shards, ...]
    return x.reshape(x.shape[:axis] + (shards, x.shape[axis] // shards) + x.shape[axis + 1:])

  def put_kv(dst, src):         # [L, B, S, H, D] <- [L, 1, s, H, D]
    out = lax.dynamic_update_slice(blocks(dst, 2), blocks(src, 2).astype(dst.dtype),
                                   (0, slot, 0, 0, 0, 0))
    return constrain(out.reshape(dst.shape), (None,) + KV, mesh)

  def put_ids(dst, src):        # [B, S] <- [1, s]; the rest of the row becomes 0
    row = lax.dynamic_update_slice(jnp.zeros_like(blocks(dst[:1], 1)), blocks(src, 1), (0, 0, 0))
    out = lax.dynamic_update_slice(blocks(dst, 1), row, (slot, 0, 0))
    return constrain(out.reshape(dst.shape), ("batch", "length"), mesh)

  pool = pool._replace(k=put_kv(pool.k, cache.k), v=put_kv(pool.v, cache.v),
                       segment_ids=put_ids(pool.segment_ids, cache.segment_ids),
                       positions=put_ids(pool.positions, cache.positions))
  as1 = lambda x: jnp.reshape(x, (1,))
  first = sample_rows(logits, jax.random.fold_in(key, 0)[None], as1(temperature), as1(top_k),
                      as1(top_p))[0]
  at = lambda x, v: x.at[slot].set(v)
  slots = Slots(pool, at(slots.last, first), at(slots.count, 1), at(slots.prompt_len, prompt_len),
                at(slots.key, key), at(slots.temperature, temperature), at(slots.top_k, top_k),
                at(slots.top_p, top_p))
  return slots, first


def decode_slots(graphdef, state, slots: Slots, active, *, mesh):
  """`decode_step` for every slot at once, each at its own length and with its own sampling
  -> (Slots, next tokens int32 [B]). `active` [B] bool: free slots are computed (the shape is
  fixed) but keep their count."""
  model = nnx.merge(graphdef, state)
  llm, cfg = model.llm, model.llm.cfg
  eps, cache = cfg.rms_norm_eps, slots.cache
  b, n = cache.new_k.shape[1], cache.new_k.shape[2]
  row = jnp.clip(slots.count - 1, 0, n - 1)             # buffer row of the token fed now, [B]
  pos = (slots.prompt_len + row)[:, None]
  one = jnp.ones((b, 1), jnp.int32)
  cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  rows = jnp.arange(n, dtype=jnp.int32)[None]
  buf_pos = slots.prompt_len[:, None] + rows
  buf_seg = (rows <= row[:, None]).astype(jnp.int32)
  here = (rows == row[:, None])[:, :, None, None]       # [B, N, 1, 1]

  def body(x, layer):
    p, ck, cv, bk, bv = layer
    q, k, v = layer_qkv(p, x, cos, sin, eps)
    bk, bv = jnp.where(here, k, bk), jnp.where(here, v, bv)
    out = decode_attention(q, one, pos, (ck, cv, cache.segment_ids, cache.positions),
                           (bk, bv, buf_seg, buf_pos), mesh=mesh)
    return layer_finish(p, x, out.reshape(q.shape).astype(x.dtype), eps), (k, v)

  x = llm.embed(slots.last[:, None])
  x, (ks, vs) = lax.scan(body, x, (llm.layer_params(), cache.k, cache.v, cache.new_k,
                                   cache.new_v))
  cache = cache._replace(new_k=jnp.where(here[None], ks, cache.new_k),
                         new_v=jnp.where(here[None], vs, cache.new_v))
  logits = llm.logits(rms_norm(x, llm.final_norm[...].astype(x.dtype), eps))[:, 0]
  keys = jax.vmap(jax.random.fold_in)(slots.key, slots.count)
  nxt = sample_rows(logits, keys, slots.temperature, slots.top_k, slots.top_p)
  nxt = jnp.where(active, nxt, slots.last)
  return slots._replace(cache=cache, last=nxt, count=slots.count + active.astype(jnp.int32)), nxt
