"""Generation: context-parallel prefill and a KV cache that stays sharded (DESIGN §5).

    tokens = generate(model, input_ids, pixel_values, max_new_tokens=32, seq_shards=8)

Prefill: the prompt is padded to a shape bucket (2*seq_shards times a power of two; padding is
segment 0), put in the zigzag layout and sharded over the `seq` mesh axis. Every layer runs ring
attention and keeps its K/V where they were computed, so the cache is [layers, B, S, Hkv, hd]
sharded over `seq`, with the positions and segment ids that say which token each row is.
Logits are computed at the last real token only (`select_logits`).

Decode: a new token attends to the sharded prompt cache — each shard computes a softmax over its
own slice and the partials are merged by log-sum-exp with pmax/psum, never gathering the cache —
and to a small replicated buffer with the generated tokens' K/V. All shapes are fixed per
bucket, so one compilation serves every decode step (a `lax.while_loop`, or a jitted step per
token when streaming).

The vision tower runs over the tiles/frames in fixed-size chunks with the frames of a chunk
spread over all devices of the mesh.

CLI (streams the answer; reports prompt tokens, prefill time and decode speed):

    python -m vita_jax.generate --model=runs/demo --prompt="What colour is the shape?" \
        --image=runs/demo_data/demo/media/img_00000.png --seq_shards=8
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vita_jax.models.common import rms_norm
from vita_jax.models.llm import layer_finish, layer_qkv, rope_tables
from vita_jax.ops.attention import attention, attention_mask
from vita_jax.ops.lm_head import select_logits
from vita_jax.ops.ring_attention import merge_partials
from vita_jax.parallel.mesh import ConfigError, make_mesh
from vita_jax.parallel.sharding import constrain, logical_to_spec, shard_state
from vita_jax.parallel.zigzag import inverse_permutation, zigzag_permutation

ACT = ("batch", "length", "act_embed")
KV = ("batch", "length", None, None)
VISION_CHUNK_PER_DEVICE = 8


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
  prompt_len: jax.Array     # scalar int32: real prompt length (position of the first new token)
  done: jax.Array           # [B] bool: row has produced EOS
  key: jax.Array


def bucket_length(n: int, seq_shards: int) -> int:
  """Smallest 2*seq_shards * 2**k >= n: few shapes, each divisible for the zigzag layout."""
  unit = 2 * seq_shards
  return unit * (1 << max(0, math.ceil(math.log2(max(1, -(-n // unit))))))


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


def _partial_attention(q, k, v, mask, scale):
  """Softmax over one key slice. q [B,Q,Hq,D], k/v [B,K,Hkv,D], mask [B,Q,K]
  -> normalised out fp32 [B,Q,Hkv,G,D], lse fp32 [B,Q,Hkv,G] (-inf where nothing is visible)."""
  b, sq, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, sq, hkv, hq // hkv, d)
  s = jnp.einsum("bqhgd,bkhd->bqhgk", qg, k, preferred_element_type=jnp.float32) * scale
  mask = mask[:, :, None, None, :]
  s = jnp.where(mask, s, -jnp.inf)
  row_max = jnp.max(s, axis=-1)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(mask, jnp.exp(s - row_max[..., None]), 0.0)
  denom = jnp.sum(p, axis=-1)
  out = jnp.einsum("bqhgk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
  lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
  return out, lse


def cache_attention(q, k, v, q_seg, q_pos, kv_seg, kv_pos, *, mesh, axis: str = "seq"):
  """Attention of a few replicated queries q [B,Q,Hq,D] to a cache k/v [B,S,Hkv,D] sharded over
  `axis`: each shard attends to its slice, partials merge by log-sum-exp (pmax + psum of
  [B,Q,Hq,D]-sized arrays). -> (out fp32 [B,Q,Hkv,G,D], lse [B,Q,Hkv,G]), replicated."""
  scale = q.shape[-1] ** -0.5

  def local(q, k, v, q_seg, q_pos, kv_seg, kv_pos):
    mask = attention_mask(q_seg, q_pos, kv_seg, kv_pos, causal=True)
    out, lse = _partial_attention(q, k, v, mask, scale)
    if mesh is None or mesh.shape.get(axis, 1) == 1:
      return out, lse
    top = lax.pmax(lse, axis)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.exp(lse - top)                       # 0 where a shard sees nothing
    total = lax.psum(weight, axis)
    out = lax.psum(out * weight[..., None], axis) / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out, lse

  if mesh is None or mesh.shape.get(axis, 1) == 1:
    return local(q, k, v, q_seg, q_pos, kv_seg, kv_pos)
  rep, seq = P(), P(None, axis)
  return jax.shard_map(local, mesh=mesh, in_specs=(rep, seq, seq, rep, rep, seq, seq),
                       out_specs=(rep, rep), check_vma=True)(q, k, v, q_seg, q_pos, kv_seg,
                                                             kv_pos)


def _prefill(graphdef, state, ids, ctx_index, features, positions, segment_ids, last, *,
             mesh, new_len):
  """Prompt (zigzag layout, [B, S]) -> (fp32 logits [B, V] at `last`, Cache)."""
  model = nnx.merge(graphdef, state)
  llm, cfg = model.llm, model.llm.cfg
  eps = cfg.rms_norm_eps
  x = llm.embed(ids)
  if features is not None:
    flat = features.reshape(-1, features.shape[-1])
    visual = jnp.take(flat, jnp.maximum(ctx_index, 0), axis=0).astype(x.dtype)
    x = jnp.where((ctx_index >= 0)[..., None], visual, x)
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


def _decode_step(graphdef, state, st: Decoding, *, mesh, sampling, eos_id, pad_id):
  """Feed the last generated token, sample the next one."""
  model = nnx.merge(graphdef, state)
  llm, cfg = model.llm, model.llm.cfg
  eps, cache = cfg.rms_norm_eps, st.cache
  b, n = st.tokens.shape
  slot = st.count - 1                                   # buffer row of the token fed now
  token = lax.dynamic_index_in_dim(st.tokens, slot, axis=1)               # [B, 1]
  pos = jnp.full((b, 1), st.prompt_len + slot, jnp.int32)
  one = jnp.ones((b, 1), jnp.int32)
  cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_theta)
  buf_pos = jnp.broadcast_to(st.prompt_len + jnp.arange(n, dtype=jnp.int32), (b, n))
  buf_seg = jnp.broadcast_to((jnp.arange(n) <= slot).astype(jnp.int32), (b, n))

  def body(x, layer):
    p, ck, cv, bk, bv = layer
    q, k, v = layer_qkv(p, x, cos, sin, eps)
    bk = lax.dynamic_update_slice_in_dim(bk, k, slot, axis=1)
    bv = lax.dynamic_update_slice_in_dim(bv, v, slot, axis=1)
    out_c, lse_c = cache_attention(q, ck, cv, one, pos, cache.segment_ids, cache.positions,
                                   mesh=mesh)
    mask = attention_mask(one, pos, buf_seg, buf_pos, causal=True)
    out_b, lse_b = _partial_attention(q, bk, bv, mask, q.shape[-1] ** -0.5)
    out, _ = merge_partials(out_c, lse_c, out_b, lse_b)
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


def _decode_loop(graphdef, state, st: Decoding, **kw):
  return lax.while_loop(_running, functools.partial(_decode_step, graphdef, state, **kw), st)


def _first(logits, key, tokens, *, sampling, eos_id):
  first = sample(logits, jax.random.fold_in(key, 0), sampling)
  return tokens.at[:, 0].set(first), first == eos_id


class _Runner:
  """The jitted functions for one model and mesh (they close over the model's graph, so the
  parameters are arguments and each shape bucket compiles once)."""

  def __init__(self, model, mesh):
    self.mesh = mesh
    graphdef, _ = nnx.split(model)
    self.prefill = jax.jit(functools.partial(_prefill, graphdef, mesh=mesh),
                           static_argnames=("new_len",))
    statics = ("sampling", "eos_id", "pad_id")
    self.step = jax.jit(functools.partial(_decode_step, graphdef, mesh=mesh),
                        static_argnames=statics, donate_argnums=(1,))
    self.loop = jax.jit(functools.partial(_decode_loop, graphdef, mesh=mesh),
                        static_argnames=statics, donate_argnums=(1,))
    self.first = jax.jit(_first, static_argnames=("sampling", "eos_id"))
    self.vision = jax.jit(lambda state, pixels: _vision_chunk(graphdef, state, pixels, mesh))
    self._placed = (None, None)

  def state(self, model):
    """The model's state placed on the mesh (copied again only when the params change)."""
    state = nnx.state(model)
    leaves, held = jax.tree.leaves(state), self._placed[0]
    if held is None or len(held) != len(leaves) or any(a is not b for a, b in zip(held, leaves)):
      self._placed = (leaves, shard_state(state, self.mesh))
    return self._placed[1]


def _vision_chunk(graphdef, state, pixels, mesh):
  model = nnx.merge(graphdef, state)
  return model.projector(model.vision(pixels, mesh=mesh))


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _runner(model, seq_shards: int) -> _Runner:
  devices = jax.devices()
  if not 1 <= seq_shards <= len(devices):
    raise ConfigError(f"seq_shards={seq_shards} needs that many devices but {len(devices)} are "
                      f"available; use --seq_shards between 1 and {len(devices)} (on CPU, fake "
                      "devices come from XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  per_model = _RUNNERS.setdefault(model, {})
  if seq_shards not in per_model:
    mesh = make_mesh({"data": 1, "fsdp": 1, "seq": seq_shards, "tensor": 1},
                     devices=devices[:seq_shards])
    per_model[seq_shards] = _Runner(model, mesh)
  return per_model[seq_shards]


def vision_features(model, pixel_values, runner: _Runner, state, *, chunk: int | None = None):
  """[T, H, W, 3] -> [T_bucket, tokens_per_tile, D]: fixed-size chunks of frames, each spread
  over the mesh's devices; T_bucket = chunk * 2**k >= T (zero rows beyond T)."""
  mesh = runner.mesh
  chunk = chunk or VISION_CHUNK_PER_DEVICE * mesh.size
  chunk = -(-chunk // mesh.size) * mesh.size
  t = pixel_values.shape[0]
  chunk = min(chunk, -(-t // mesh.size) * mesh.size)
  n_chunks = -(-t // chunk)
  pixels = np.zeros((n_chunks * chunk,) + pixel_values.shape[1:], np.float32)
  pixels[:t] = np.asarray(pixel_values, np.float32)
  spec = logical_to_spec(("tiles", None, None, None), mesh, (chunk,) + pixels.shape[1:])
  sharding = NamedSharding(mesh, spec)
  parts = [runner.vision(state, jax.device_put(pixels[i * chunk:(i + 1) * chunk], sharding))
           for i in range(n_chunks)]
  total = chunk * (1 << math.ceil(math.log2(n_chunks)))
  if total > n_chunks * chunk:
    parts.append(jnp.zeros((total - n_chunks * chunk,) + parts[0].shape[1:], parts[0].dtype))
  return jnp.concatenate(parts, axis=0)


def _context_index(ids: np.ndarray, context_ids, pixel_values, tokens_per_tile: int):
  """int32 [B, S]: row of the flattened visual features for each context token, -1 elsewhere."""
  is_ctx = np.isin(ids, np.asarray(context_ids))
  if pixel_values is None:
    return np.full(ids.shape, -1, np.int32)
  expected = pixel_values.shape[0] * tokens_per_tile
  if int(is_ctx.sum()) != expected:
    raise ValueError(
        f"the prompt has {int(is_ctx.sum())} visual context tokens but pixel_values gives "
        f"{pixel_values.shape[0]} tiles x {tokens_per_tile} tokens = {expected}; build the "
        "prompt with vita_jax.data.conversation so every tile/frame has its token block")
  index = np.cumsum(is_ctx.reshape(-1)).reshape(ids.shape) - 1
  return np.where(is_ctx, index, -1).astype(np.int32)


def max_length_of(model) -> int | None:
  """The configured maximum sequence length (config.llm.max_position_embeddings), if any."""
  value = model.config.llm.get("max_position_embeddings", None)
  return int(value) if value else None


def prefill(model, input_ids, pixel_values=None, *, seq_shards: int = 1, max_new_tokens: int = 1,
            max_length: int | None = None, vision_chunk: int | None = None,
            timings: dict | None = None):
  """Run the prompt; -> (fp32 logits [B, V] at the last prompt token, Cache, prompt_len).

  The prompt is padded to `bucket_length(S, seq_shards)`, zigzagged and sharded over `seq`.
  """
  import time
  ids = np.asarray(input_ids, np.int32)
  if ids.ndim != 2 or ids.shape[1] == 0:
    raise ValueError(f"input_ids must be int [batch, seq] with seq > 0; got shape {ids.shape}")
  b, s = ids.shape
  max_length = max_length if max_length is not None else max_length_of(model)
  if max_length is not None and s + max_new_tokens > max_length:
    raise ValueError(
        f"the prompt has {s} tokens and max_new_tokens={max_new_tokens}, {s + max_new_tokens} "
        f"in all, more than the model's maximum length {max_length} "
        "(config.llm.max_position_embeddings); shorten the prompt (fewer frames or tiles) or "
        "generate fewer tokens")
  runner = _runner(model, seq_shards)
  mesh = runner.mesh
  state = runner.state(model)
  t0 = time.perf_counter()
  features = None
  tpt = 0
  if pixel_values is not None and pixel_values.shape[0] > 0:
    features = vision_features(model, pixel_values, runner, state, chunk=vision_chunk)
    tpt = features.shape[1]
  else:
    pixel_values = None
  ctx = _context_index(ids, model.context_ids, pixel_values, tpt)
  length = bucket_length(s, seq_shards)
  perm = zigzag_permutation(length, seq_shards)
  pad = lambda x, v: np.pad(x, ((0, 0), (0, length - s)), constant_values=v)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  segments = np.broadcast_to((np.arange(length) < s).astype(np.int32), (b, length))
  seq_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh, (b, length)))
  put = lambda x: jax.device_put(np.ascontiguousarray(x[:, perm]), seq_sharding)
  last = np.full((b,), inverse_permutation(perm)[s - 1], np.int32)
  new_len = max(16, 1 << math.ceil(math.log2(max(1, max_new_tokens))))
  logits, cache = runner.prefill(state, put(pad(ids, 0)), put(pad(ctx, -1)), features,
                                 put(positions), put(segments), jnp.asarray(last),
                                 new_len=new_len)
  if timings is not None:
    jax.block_until_ready(logits)
    timings["prefill_s"] = time.perf_counter() - t0
    timings["prompt_tokens"] = s
    timings["bucket"] = length
  return logits, cache, s


def generate(model, input_ids, pixel_values=None, *, max_new_tokens: int, seq_shards: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             eos_id: int | None = None, seed: int = 0, max_length: int | None = None,
             vision_chunk: int | None = None, on_token=None, timings: dict | None = None):
  """Generate up to `max_new_tokens` tokens after `input_ids` int [B, S] -> int32 [B, new].

  Greedy at temperature 0. Generation stops early once every row has produced `eos_id`
  (which is kept; rows that finished earlier are filled with the config's pad id).
  `pixel_values` float32 [tiles, H, W, 3] feed the visual context tokens in order.
  `on_token(step, tokens [B])` streams tokens as they come (one jitted call per token);
  without it the whole decode is one `lax.while_loop`.
  """
  import time
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  logits, cache, s = prefill(model, input_ids, pixel_values, seq_shards=seq_shards,
                             max_new_tokens=max_new_tokens, max_length=max_length,
                             vision_chunk=vision_chunk, timings=timings)
  runner = _runner(model, seq_shards)
  state = runner.state(model)
  sampling = Sampling(float(temperature), int(top_k), float(top_p))
  eos = -1 if eos_id is None else int(eos_id)
  pad = int(model.config.tokens.get("pad_id", 0))
  key = jax.random.PRNGKey(seed)
  b, n = logits.shape[0], cache.new_k.shape[2]
  tokens, done = runner.first(logits, key, jnp.zeros((b, n), jnp.int32), sampling=sampling,
                              eos_id=eos)
  # Scalars replicated on the mesh, as the step returns them: same input shardings every call.
  scalars = jax.device_put((np.int32(1), np.int32(max_new_tokens), np.int32(s), key),
                           NamedSharding(runner.mesh, P()))
  st = Decoding(cache, tokens, scalars[0], scalars[1], scalars[2], done, scalars[3])
  kw = dict(sampling=sampling, eos_id=eos, pad_id=pad)
  t0 = time.perf_counter()
  if on_token is None:
    st = runner.loop(state, st, **kw)
  else:
    # Host-side reads of whole small arrays: indexing a device array with a new Python int
    # each step would compile a new slice op per token.
    count, tokens, done = 1, np.asarray(st.tokens), np.asarray(st.done)
    on_token(0, tokens[:, 0])
    while count < max_new_tokens and not done.all():
      st = runner.step(state, st, **kw)
      count, tokens, done = count + 1, np.asarray(st.tokens), np.asarray(st.done)
      on_token(count - 1, tokens[:, count - 1])
  count = int(st.count)
  out = np.asarray(st.tokens[:, :count])
  if timings is not None:
    timings["decode_s"] = time.perf_counter() - t0
    timings["new_tokens"] = count
  return out


# ----------------------------------------------------------------------------- command line


def load_for_inference(path: str, *, tokenizer: str = "", dtype: str | None = None):
  """(model, tokenizer) from a training workdir (config.json + checkpoints/) or an HF dir."""
  import os

  from vita_jax import workdir as workdir_lib
  from vita_jax.data.tokenizer import load_tokenizer
  if workdir_lib.is_workdir(path):
    model, config = workdir_lib.load_model_from_workdir(path, dtype=dtype)
    candidates = [tokenizer, config.data.tokenizer, os.path.join(path, "tokenizer")]
  elif os.path.isfile(os.path.join(path, "config.json")):
    import vita_jax
    model = vita_jax.load_pretrained(path, dtype=dtype or "float32")
    candidates = [tokenizer, path]
  else:
    raise ConfigError(f"--model={path!r} is neither a training workdir (with checkpoints/) nor "
                      "a Hugging Face directory (with config.json)")
  found = next((c for c in candidates if c and os.path.isdir(c)), None)
  if found is None:
    raise ConfigError(f"no tokenizer found for {path!r} (tried {[c for c in candidates if c]});"
                      " pass --tokenizer=DIR")
  return model, load_tokenizer(found)


def build_prompt(model, tok, prompt: str, images=(), video: str = "", max_frames: int = 64,
                 frames=None):
  """A one-turn ChatML prompt ending with `<|im_start|>assistant\n` -> (ids int32 [1, S],
  pixel_values [tiles, H, W, 3] or None). `frames` (uint8 [N, h, w, 3]) is a video in memory."""
  from PIL import Image

  from configs.base import tokens_per_tile
  from vita_jax.data import image as image_lib
  from vita_jax.data import video as video_lib
  from vita_jax.data.conversation import encode_conversation
  cfg = model.config
  tile, max_tiles = cfg.vision.image_size, cfg.max_tiles
  pictures = [image_lib.load_image(p) for p in images]
  clips = []
  if video:
    clips.append(video_lib.load_video(video, tile, max_frames))
  if frames is not None:
    clips.append(image_lib.normalize(np.stack(
        [image_lib.resize_square(Image.fromarray(f), tile) for f in frames])))
  grids = [image_lib.grid_of(p.size, tile, max_tiles) for p in pictures]
  enc = encode_conversation([{"role": "user", "content": prompt}], tok, tokens_per_tile(cfg),
                            grids, [len(c) for c in clips])
  ids = list(enc.ids) + [tok.ids["<|im_start|>"]] + tok.encode("assistant\n")
  pixels = [image_lib.dynamic_tiles(pictures[i], tile, max_tiles) if kind == "image"
            else clips[i] for kind, i in enc.visual_order]
  pixels = np.concatenate(pixels).astype(np.float32) if pixels else None
  return np.asarray([ids], np.int32), pixels


def main(argv):
  import sys
  import time

  from absl import flags
  f = flags.FLAGS
  model, tok = load_for_inference(f.model, tokenizer=f.tokenizer, dtype=f.dtype)
  ids, pixels = build_prompt(model, tok, f.prompt, f.image or (), f.video, f.max_frames)
  eos = int(model.config.tokens.eos_id)
  got, stamps, shown = [], [], [""]

  def on_token(_, tokens):
    stamps.append(time.perf_counter())
    got.append(int(tokens[0]))
    text = tok.decode([t for t in got if t != eos], skip_special_tokens=True)
    sys.stdout.write(text[len(shown[0]):])
    sys.stdout.flush()
    shown[0] = text

  timings: dict = {}
  generate(model, ids, pixels, max_new_tokens=f.max_new_tokens, seq_shards=f.seq_shards,
           temperature=f.temperature, top_p=f.top_p, top_k=f.top_k, eos_id=eos, seed=f.seed,
           on_token=on_token, timings=timings)
  # The first decode step includes its compilation: the rate is over the steps after it.
  steady = (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else float("nan")
  tiles = 0 if pixels is None else len(pixels)
  print(f"\n[prompt {timings['prompt_tokens']} tokens ({tiles} tiles/frames, bucket "
        f"{timings['bucket']}, seq_shards={f.seq_shards}) | prefill {timings['prefill_s']:.2f} s "
        f"(incl. compile) | {len(got)} new tokens, decode {steady:.1f} tokens/s]", flush=True)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("model", None, "training workdir or Hugging Face directory", required=True)
  flags.DEFINE_string("prompt", None, "the user's question", required=True)
  flags.DEFINE_multi_string("image", [], "image file(s), in order")
  flags.DEFINE_string("video", "", "video file or directory of frames")
  flags.DEFINE_integer("max_frames", 64, "at most this many video frames (1 fps)")
  flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most")
  flags.DEFINE_integer("seq_shards", 1, "devices the prompt (and its KV cache) is sharded over")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
  flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the model's)")
  flags.DEFINE_string("dtype", None, "compute dtype override, e.g. float32")


if __name__ == "__main__":
  from vita_jax import cli
  _define_flags()
  cli.run(main)
