"""Generation: context-parallel prefill and a sharded KV cache (docs/design.md#contracts).

    tokens = generate(model, input_ids, pixel_values, max_new_tokens=32, seq_shards=8)

Prefill: each row of the prompt (rows may differ in length) is padded after its last token to a
shape bucket (2*seq_shards times a power of two; padding is segment 0), put in the zigzag layout
and sharded over the `seq` mesh axis. Every layer runs ring attention and keeps its K/V where
they were computed, so the cache is [layers, B, S, Hkv, hd] sharded over `seq`, with the
positions and segment ids that say which token each row is. Logits are computed at each row's
last real token only (`select_logits`).

Decode: each row's new token, at that row's own position, attends to the sharded prompt cache —
each shard computes a softmax over its own slice and the partials are merged by log-sum-exp with
pmax/psum, never gathering the cache — and to a small replicated buffer with the generated
tokens' K/V. All shapes are fixed per bucket, so one compilation serves every decode step (a
`lax.while_loop`, or a jitted step per token when streaming).

The vision tower runs over the tiles/frames in fixed-size chunks with the frames of a chunk
spread over all devices of the mesh.

Where things live: the jitted prefill and decode steps in vita_jax.models.decoding, the
sharded-cache attention in vita_jax.ops.cache_attention, the prompt builder in
vita_jax.data.prompt and the command line at the end of this file.

CLI (streams the answer; reports prompt tokens, prefill time and decode speed):

    python -m vita_jax.generate --model=runs/demo --prompt="What colour is the shape?" \
        --image=runs/demo_data/demo/media/img_00000.png --seq_shards=8
"""

from __future__ import annotations

import functools
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vita_jax.errors import ConfigError, InputError
from vita_jax.models import decoding
from vita_jax.models.decoding import Cache, Decoding, Sampling, sample
from vita_jax.parallel.mesh import make_mesh
from vita_jax.parallel.sharding import logical_to_spec, shard_state
from vita_jax.spec.tokens import check_visual_tokens, context_index
from vita_jax.spec.zigzag import inverse_permutation, zigzag_permutation

__all__ = ["Cache", "ConfigError", "Decoding", "InputError", "Sampling", "bucket_length",
           "build_prompt", "generate", "load_for_inference", "max_length_of", "placement",
           "prefill", "prompt_rows", "sample", "vision_features"]

VISION_CHUNK_PER_DEVICE = 8


def bucket_length(n: int, seq_shards: int) -> int:
  """Smallest 2*seq_shards * 2**k >= n: few shapes, each divisible for the zigzag layout."""
  unit = 2 * seq_shards
  return unit * (1 << max(0, math.ceil(math.log2(max(1, -(-n // unit))))))


class _Runner:
  """The jitted functions for one model and mesh (they close over the model's graph, so the
  parameters are arguments and each shape bucket compiles once)."""

  def __init__(self, model, mesh):
    self.mesh = mesh
    graphdef, _ = nnx.split(model)
    self.prefill = jax.jit(functools.partial(decoding.prefill_step, graphdef, mesh=mesh),
                           static_argnames=("new_len",))
    statics = ("sampling", "eos_id", "pad_id")
    self.step = jax.jit(functools.partial(decoding.decode_step, graphdef, mesh=mesh),
                        static_argnames=statics, donate_argnums=(1,))
    self.loop = jax.jit(functools.partial(decoding.decode_loop, graphdef, mesh=mesh),
                        static_argnames=statics, donate_argnums=(1,))
    self.first = jax.jit(decoding.first_token, static_argnames=("sampling", "eos_id"))
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


def _runner(model, seq_shards: int, fsdp: int = 1, tensor: int = 1) -> _Runner:
  """The runner of a generation mesh: the prompt and its KV cache sharded over `seq`, the
  parameters over `fsdp` and `tensor` by their logical axes (so a model too large for one device
  is served by several)."""
  devices = jax.devices()
  sizes = {"data": 1, "fsdp": fsdp, "seq": seq_shards, "tensor": tensor}
  bad = {k: v for k, v in sizes.items() if v < 1}
  if bad or seq_shards * fsdp * tensor > len(devices):
    raise ConfigError(f"seq_shards={seq_shards} x fsdp={fsdp} x tensor={tensor} needs that many "
                      f"devices but {len(devices)} are available; use sizes >= 1 whose product "
                      f"is at most {len(devices)} (on CPU, fake devices come from "
                      "XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  per_model = _RUNNERS.setdefault(model, {})
  key = (seq_shards, fsdp, tensor)
  if key not in per_model:
    mesh = make_mesh(sizes, devices=devices[:seq_shards * fsdp * tensor])
    per_model[key] = _Runner(model, mesh)
  return per_model[key]


def placement(model, seq_shards: int = 1):
  """(mesh, model state placed on it) that `prefill` uses, for decoders that jit their own steps
  over the same placement (vita_jax.serving.engine)."""
  runner = _runner(model, seq_shards)
  return runner.mesh, runner.state(model)


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


def max_length_of(model) -> int | None:
  """The configured maximum sequence length (config.llm.max_position_embeddings), if any."""
  value = model.config.llm.get("max_position_embeddings", None)
  return int(value) if value else None


def prompt_rows(input_ids) -> tuple[np.ndarray, np.ndarray]:
  """The prompt as (ids int32 [B, S] right-padded with 0, lengths int32 [B]).

  `input_ids` is an int array [B, S] (every row S tokens) or a sequence of B 1-D int sequences
  of any lengths (a ragged batch; S is the longest)."""
  if isinstance(input_ids, (list, tuple)):
    rows = [np.asarray(r) for r in input_ids]
    if not rows:
      raise InputError("input_ids is an empty list; give at least one row of token ids")
    for i, r in enumerate(rows):
      if r.ndim != 1:
        raise InputError(f"row {i} of input_ids must be a 1-D sequence of token ids; got shape "
                         f"{r.shape} (build_prompt returns [1, S]: pass its row, ids[0])")
      if r.size == 0:
        raise InputError(f"row {i} of input_ids is empty; every row needs at least one token")
    lengths = np.asarray([r.size for r in rows], np.int32)
    ids = np.zeros((len(rows), int(lengths.max())), np.int32)
    for i, r in enumerate(rows):
      ids[i, :r.size] = r
    return ids, lengths
  ids = np.asarray(input_ids, np.int32)
  if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
    raise InputError(f"input_ids must be int [batch, seq] with batch, seq > 0, or a list of 1-D "
                     f"rows; got shape {ids.shape}")
  return ids, np.full((ids.shape[0],), ids.shape[1], np.int32)


def prefill(model, input_ids, pixel_values=None, *, seq_shards: int = 1, max_new_tokens: int = 1,
            max_length: int | None = None, vision_chunk: int | None = None,
            timings: dict | None = None, fsdp: int = 1, tensor: int = 1):
  """Run the prompt; -> (fp32 logits [B, V] at each row's last prompt token, Cache,
  prompt lengths int32 [B]).

  `input_ids`: an int array [B, S], or a list of B 1-D int sequences of any lengths (a ragged
  batch; see `prompt_rows`). Each row is padded after its last token with segment id 0 to
  `bucket_length(longest row, seq_shards)`, its real tokens at positions 0..len-1; the rows are
  zigzagged and sharded over `seq`. `pixel_values` feed the visual context tokens in order, row
  0's first.
  """
  import time
  ids, lengths = prompt_rows(input_ids)
  b, s = ids.shape
  max_length = max_length if max_length is not None else max_length_of(model)
  if max_length is not None and s + max_new_tokens > max_length:
    row = (f"the longest row of the prompt ({int(np.argmax(lengths))})"
           if lengths.min() != lengths.max() else "the prompt")
    raise InputError(
        f"{row} has {s} tokens and max_new_tokens={max_new_tokens}, {s + max_new_tokens} "
        f"in all, more than the model's maximum length {max_length} "
        "(config.llm.max_position_embeddings); shorten the prompt (fewer frames or tiles) or "
        "generate fewer tokens")
  runner = _runner(model, seq_shards, fsdp, tensor)
  mesh = runner.mesh
  state = runner.state(model)
  t0 = time.perf_counter()
  features, ctx = None, np.full(ids.shape, -1, np.int32)
  if pixel_values is not None and pixel_values.shape[0] > 0:
    features = vision_features(model, pixel_values, runner, state, chunk=vision_chunk)
    # Padding is never a context token: features go to the rows' own tokens in order.
    visible = np.where(np.arange(s)[None] < lengths[:, None], ids, -1)
    check_visual_tokens(visible, model.context_ids, pixel_values.shape[0], features.shape[1])
    ctx = context_index(visible, model.context_ids)
  length = bucket_length(s, seq_shards)
  perm = zigzag_permutation(length, seq_shards)
  pad = lambda x, v: np.pad(x, ((0, 0), (0, length - s)), constant_values=v)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  segments = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  seq_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh, (b, length)))
  put = lambda x: jax.device_put(np.ascontiguousarray(x[:, perm]), seq_sharding)
  last = inverse_permutation(perm)[lengths - 1].astype(np.int32)
  new_len = max(16, 1 << math.ceil(math.log2(max(1, max_new_tokens))))
  logits, cache = runner.prefill(state, put(pad(ids, 0)), put(pad(ctx, -1)), features,
                                 put(positions), put(segments), jnp.asarray(last),
                                 new_len=new_len)
  if timings is not None:
    jax.block_until_ready(logits)
    timings["prefill_s"] = time.perf_counter() - t0
    timings["prompt_tokens"] = s                      # the longest row
    timings["bucket"] = length
  return logits, cache, lengths


def generate(model, input_ids, pixel_values=None, *, max_new_tokens: int, seq_shards: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             eos_id: int | None = None, seed: int = 0, max_length: int | None = None,
             vision_chunk: int | None = None, on_token=None, timings: dict | None = None,
             fsdp: int = 1, tensor: int = 1):
  """Generate up to `max_new_tokens` tokens after each row of `input_ids` -> int32 [B, new].

  `input_ids` is an int array [B, S] or a list of B 1-D int sequences of different lengths (a
  ragged batch): each row is padded after its end with segment id 0 and decoded from its own
  length, so its greedy tokens are those of generating that row alone (sampling draws one key
  per step for the whole batch, so a sampled row also depends on the others).
  The generation mesh has `seq_shards` x `fsdp` x `tensor` devices: the prompt and KV cache are
  split over `seq`, the parameters over `fsdp` and `tensor` (docs/inference.md).
  Greedy at temperature 0. Generation stops early once every row has produced `eos_id`
  (which is kept; rows that finished earlier are filled with the config's pad id).
  `pixel_values` float32 [tiles, H, W, 3] feed the visual context tokens in order (row 0's
  first, then row 1's, ...).
  `on_token(step, tokens [B])` streams tokens as they come (one jitted call per token);
  without it the whole decode is one `lax.while_loop`.
  """
  import time
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1 (--max_new_tokens)")
  logits, cache, lengths = prefill(model, input_ids, pixel_values, seq_shards=seq_shards,
                                   max_new_tokens=max_new_tokens, max_length=max_length,
                                   vision_chunk=vision_chunk, timings=timings, fsdp=fsdp,
                                   tensor=tensor)
  runner = _runner(model, seq_shards, fsdp, tensor)
  state = runner.state(model)
  sampling = Sampling(float(temperature), int(top_k), float(top_p))
  eos = -1 if eos_id is None else int(eos_id)
  pad = int(model.config.tokens.get("pad_id", 0))
  key = jax.random.PRNGKey(seed)
  b, n = logits.shape[0], cache.new_k.shape[2]
  tokens, done = runner.first(logits, key, jnp.zeros((b, n), jnp.int32), sampling=sampling,
                              eos_id=eos)
  # Scalars and the lengths [B] replicated on the mesh, as the step returns them: the same input
  # shardings every call.
  scalars = jax.device_put((np.int32(1), np.int32(max_new_tokens), lengths, key),
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


def load_for_inference(path: str, *, tokenizer: str = "", dtype: str | None = None):
  """(model, tokenizer) from a training workdir (config.json + checkpoints/) or an HF dir.

  The tokenizer is `tokenizer`, else the run's (workdir) or the directory's own; the model's
  special-token ids must match it (a ConfigError names the first that differs)."""
  import os

  from vita_jax.checkpoints import workdir as workdir_lib
  from vita_jax.data.tokenizer import check_token_ids, load_tokenizer
  if workdir_lib.is_workdir(path):
    model, config = workdir_lib.load_model_from_workdir(path, dtype=dtype)
    candidates = [tokenizer, config.data.tokenizer, os.path.join(path, "tokenizer")]
  elif os.path.isfile(os.path.join(path, "config.json")):
    import vita_jax
    model = vita_jax.load_pretrained(path, dtype=dtype or "float32", tokenizer=tokenizer)
    candidates = [tokenizer, path]
  else:
    raise ConfigError(f"--model={path!r} is neither a training workdir (with checkpoints/) nor "
                      "a Hugging Face directory (with config.json)")
  found = next((c for c in candidates if c and os.path.isdir(c)), None)
  if found is None:
    raise ConfigError(f"no tokenizer found for {path!r} (tried {[c for c in candidates if c]});"
                      " pass --tokenizer=DIR")
  tok = load_tokenizer(found)
  check_token_ids(tok, model.config.tokens)
  return model, tok


def build_prompt(model, tok, prompt: str, images=(), video: str = "", max_frames: int = 64,
                 frames=None):
  """A one-turn ChatML prompt ending with `<|im_start|>assistant\n` -> (ids int32 [1, S],
  pixel_values [tiles, H, W, 3] or None). `frames` (uint8 [N, h, w, 3]) is a video in memory.
  See vita_jax.data.prompt.encode_prompt."""
  from vita_jax.data.prompt import encode_prompt
  return encode_prompt(model.config, tok, prompt, images, [video] if video else [], max_frames,
                       frames)


# The command line: python -m vita_jax.generate --model=DIR --prompt=... [--image=F] [--video=F]


def main(argv):
  import sys
  import time

  f = FLAGS
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
           fsdp=f.fsdp_shards, tensor=f.tensor_shards,
           temperature=f.temperature, top_p=f.top_p, top_k=f.top_k, eos_id=eos, seed=f.seed,
           on_token=on_token, timings=timings)
  # The first decode step includes its compilation: the rate is over the steps after it.
  rate = (f"decode {(len(stamps) - 2) / (stamps[-1] - stamps[1]):.1f} tokens/s"
          if len(stamps) > 2 else "too few tokens to time decode")
  tiles = 0 if pixels is None else len(pixels)
  print(f"\n[prompt {timings['prompt_tokens']} tokens ({tiles} tiles/frames, bucket "
        f"{timings['bucket']}, seq_shards={f.seq_shards}) | prefill {timings['prefill_s']:.2f} s "
        f"(incl. compile) | {len(got)} new tokens, {rate}]", flush=True)


# The command's flags, in its own FlagValues (see vita_jax.cli.run).
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "training workdir or Hugging Face directory", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "the user's question", required=True, flag_values=FLAGS)
flags.DEFINE_multi_string("image", [], "image file(s), in order", flag_values=FLAGS)
flags.DEFINE_string("video", "", "video file or directory of frames", flag_values=FLAGS)
flags.DEFINE_integer("max_frames", 64, "at most this many video frames (1 fps)", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most", flag_values=FLAGS)
flags.DEFINE_integer("seq_shards", 1, "devices the prompt (and its KV cache) is sharded over",
                     flag_values=FLAGS)
flags.DEFINE_integer("fsdp_shards", 1, "devices the parameters are sharded over (fsdp axis)",
                     flag_values=FLAGS)
flags.DEFINE_integer("tensor_shards", 1, "devices the heads / MLP / vocab are split over (tensor "
                     "axis)", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the model's)",
                    flag_values=FLAGS)
flags.DEFINE_string("dtype", None, "compute dtype override, e.g. float32", flag_values=FLAGS)


if __name__ == "__main__":
  from vita_jax import cli
  cli.run(main, flag_values=FLAGS)
