"""PyTorch-mirror generation: KV cache, optional context parallelism (docs/design.md#contracts).

    tokens = generate(model, input_ids, pixel_values, max_new_tokens=32)          # [B, new]

With `context_parallel=True` (an initialised process group, e.g. under torchrun) the prompt is
padded to a multiple of 2N (padding is segment 0), put in the zigzag layout and split over the N
ranks; prefill runs ring attention and every rank keeps the K/V of its own tokens. Decode
tokens are computed on every rank; their K/V go to one rank in turn (round-robin) and attention
merges the ranks' partial softmaxes (ring.sharded_decode_attention), so the cache stays split.
Every rank returns the same tokens.

Greedy at temperature 0. Generation stops once every row has produced `eos_id` (kept; rows
that finished earlier are filled with the config's pad id), as vita_jax.generate does.

CLI (rank 0 prints):

    torchrun --nproc_per_node=4 -m vita_torch.generate --model=DIR --prompt="Describe it." \
        --image=cat.png --context_parallel
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from absl import flags

from vita_jax.errors import ConfigError
from vita_torch.model import dense_attention
from vita_torch.ring import (
  block_attention,
  ring_attention,
  sharded_decode_attention,
  zigzag_indices,
)

DENSE_MAX_TOKENS = 8192     # longer single-process prompts use the tiled attention

# Flags live in this command's own FlagValues (see vita_jax.cli.run).
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "Hugging Face checkpoint directory (either layout)",
                    required=True, flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "the user's question", required=True, flag_values=FLAGS)
flags.DEFINE_multi_string("image", [], "image file(s), in order", flag_values=FLAGS)
flags.DEFINE_multi_string("video", [], "video file(s) or frame directories, in order",
                          flag_values=FLAGS)
flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the --model directory)",
                    flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"], "compute dtype",
                  flag_values=FLAGS)
flags.DEFINE_string("device", "auto", "auto | npu | cuda | cpu", flag_values=FLAGS)
flags.DEFINE_bool("context_parallel", False,
                  "split the prompt over the torchrun ranks (ring attention)", flag_values=FLAGS)


class KVCache:
  """K/V of the tokens this rank holds ([layers, B, capacity, Hkv, hd]) with their segment ids
  and positions; unused slots have segment 0, so attention never sees them."""

  def __init__(self, model, batch: int, capacity: int):
    c = model.cfg.llm
    shape = (c.num_layers, batch, capacity, c.num_kv_heads, c.head_dim)
    self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
    self.v = torch.zeros_like(self.k)
    self.segment_ids = torch.zeros(batch, capacity, dtype=torch.long, device=model.device)
    self.positions = torch.zeros_like(self.segment_ids)
    self.length = self.end = 0

  def add(self, segment_ids, positions, store: bool = True):
    """Reserve slots for this step's tokens (none when this rank does not keep them)."""
    n = segment_ids.shape[1] if store else 0
    if self.length + n > self.k.shape[2]:
      raise RuntimeError(f"KV cache of {self.k.shape[2]} slots is full")
    self.end = self.length + n
    self.segment_ids[:, self.length:self.end] = segment_ids[:, :n]
    self.positions[:, self.length:self.end] = positions[:, :n]

  def write(self, layer: int, k, v):
    self.k[layer, :, self.length:self.end] = k
    self.v[layer, :, self.length:self.end] = v

  def view(self, layer: int):
    e = self.end
    return (self.k[layer, :, :e], self.v[layer, :, :e], self.segment_ids[:, :e],
            self.positions[:, :e])

  def commit(self):
    self.length = self.end


def sample(logits, generator, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """logits [B, V] -> int64 [B]: argmax at temperature 0, else top-k / top-p sampling."""
  if temperature <= 0:
    return logits.argmax(-1)
  logits = logits.float().cpu() / temperature
  if top_k > 0:
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
  if top_p < 1.0:
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= top_p      # always keeps the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    logits = logits.masked_fill(drop, float("-inf"))
  return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _world(context_parallel: bool, group):
  if not context_parallel:
    return 1, 0
  if not dist.is_initialized():
    raise RuntimeError("context_parallel=True needs an initialised process group; run under "
                       "torchrun (vita_torch.device.init_distributed) or pass "
                       "context_parallel=False")
  return dist.get_world_size(group), dist.get_rank(group)


@torch.inference_mode()
def prefill(model, input_ids, pixel_values=None, *, context_parallel: bool = False, group=None,
            extra_slots: int = 0):
  """Run the prompt int [B, S] -> (fp32 logits [B, V] at its last token, KVCache).

  With context_parallel the prompt is padded to a multiple of 2N, zigzagged and split over the
  ranks of `group`; each rank's cache holds its own tokens plus `extra_slots` free slots.
  """
  world, rank = _world(context_parallel, group)
  device, pad_id = model.device, int(model.cfg.tokens.get("pad_id", 0))
  ids = input_ids.to(device).long()
  b, s = ids.shape
  padded = -(-s // (2 * world)) * 2 * world
  fill = pad_id if 0 <= pad_id < model.cfg.llm.vocab_size else 0
  full_ids = F.pad(ids, (0, padded - s), value=fill)
  full_seg = (torch.arange(padded, device=device) < s).long().expand(b, padded)
  full_pos = torch.arange(padded, device=device).expand(b, padded)
  index = zigzag_indices(padded, rank, world).to(device)
  fidx = None                                        # which visual token each context token takes
  if pixel_values is not None:
    fidx = F.pad(model.context_index(ids, pixel_values.shape[0]), (0, padded - s), value=-1)
    fidx = fidx[:, index]
  seg, pos = full_seg[:, index], full_pos[:, index]
  cache = KVCache(model, b, index.numel() + extra_slots)
  cache.add(seg, pos)

  def attend(layer, q, k, v):
    cache.write(layer, k, v)
    if context_parallel:
      return ring_attention(q, k, v, seg, pos, group=group)
    if q.shape[1] > DENSE_MAX_TOKENS:               # tiled: no [S, S] mask or score matrix
      return block_attention(q, k, v, seg, pos, seg, pos)[0].to(q.dtype)
    return dense_attention(q, k, v, seg, pos)

  x = model.embed(full_ids[:, index], pixel_values, fidx)
  hidden = model.decode(x, pos, attend)
  cache.commit()
  last = hidden[:, index == s - 1].sum(1)            # zeros on ranks without the last token
  if context_parallel:
    dist.all_reduce(last, group=group)
  return model.logits(last).float(), cache


@torch.inference_mode()
def generate(model, input_ids, pixel_values=None, *, max_new_tokens: int,
             context_parallel: bool = False, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, eos_id: int | None = None, seed: int = 0, group=None):
  """Up to `max_new_tokens` tokens after `input_ids` int [B, S] -> int64 [B, new]."""
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1 (--max_new_tokens)")
  world, rank = _world(context_parallel, group)
  logits, cache = prefill(model, input_ids, pixel_values, context_parallel=context_parallel,
                          group=group, extra_slots=-(-max_new_tokens // world))
  device, pad_id = model.device, int(model.cfg.tokens.get("pad_id", 0))
  b, s = input_ids.shape
  generator = torch.Generator().manual_seed(seed)
  src = dist.get_global_rank(group or dist.group.WORLD, 0) if context_parallel else 0
  done = torch.zeros(b, dtype=torch.bool, device=device)
  tokens = []
  for t in range(max_new_tokens):
    token = sample(logits, generator, temperature, top_k, top_p).to(device)
    if context_parallel:
      dist.broadcast(token, src=src, group=group)
    token = torch.where(done, torch.full_like(token, pad_id), token)
    tokens.append(token)
    if eos_id is not None:
      done |= token == eos_id
    if t + 1 == max_new_tokens or bool(done.all()):
      break
    step_seg = torch.ones(b, 1, dtype=torch.long, device=device)
    step_pos = torch.full((b, 1), s + t, dtype=torch.long, device=device)
    owner = t % world == rank                          # who keeps this token's K/V
    cache.add(step_seg, step_pos, store=owner)

    def attend_step(layer, q, k, v, owner=owner, step_seg=step_seg, step_pos=step_pos):
      if owner:
        cache.write(layer, k, v)
      kc, vc, kseg, kpos = cache.view(layer)
      if context_parallel:
        return sharded_decode_attention(q, step_seg, step_pos, kc, vc, kseg, kpos, group=group)
      return dense_attention(q, kc, vc, step_seg, step_pos, kseg, kpos)

    step_ids = token if eos_id is None else torch.where(done, eos_id, token)   # a valid id
    hidden = model.decode(model.embed(step_ids[:, None]), step_pos, attend_step)
    cache.commit()
    logits = model.logits(hidden[:, -1]).float()
  return torch.stack(tokens, 1)


# ---------------------------------------------------------------- CLI


def build_prompt(tok, cfg, prompt: str, images=(), videos=()):
  """The prompt of vita_jax.data.prompt.encode_prompt (the same ids as vita_jax.generate for the
  same command) -> (ids int64 [1, S], pixels float32 NCHW [tiles, 3, H, W] or None)."""
  from vita_jax.data.prompt import encode_prompt

  ids, pixels = encode_prompt(cfg, tok, prompt, images, videos, cfg.get("max_frames", 64))
  if pixels is not None:
    pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
  return torch.from_numpy(ids).long(), pixels


def main(argv):
  import os
  import time

  import vita_torch
  from vita_jax.data.tokenizer import check_token_ids, load_tokenizer
  from vita_torch.device import init_distributed
  f = FLAGS
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {argv[1:]}; every option is a --flag=value")
  if os.path.isdir(os.path.join(f.model, "checkpoints")):     # a vita_jax.train workdir
    raise ConfigError(f"--model={f.model!r} is a JAX training workdir; export it first with "
                      f"`python -m vita_jax.convert {f.model} OUT_DIR` and pass --model=OUT_DIR")
  if not os.path.isfile(os.path.join(f.model, "config.json")):
    raise ConfigError(f"--model={f.model!r} is not a Hugging Face checkpoint directory (no "
                      "config.json); pass a directory written by vita_jax.convert or a release")
  device = init_distributed(f.device)
  rank = dist.get_rank() if dist.is_initialized() else 0
  model = vita_torch.load_pretrained(f.model, dtype=getattr(torch, f.dtype), device=device,
                                     tokenizer=f.tokenizer)
  tok = load_tokenizer(f.tokenizer or f.model)
  check_token_ids(tok, model.cfg.tokens)
  ids, pixels = build_prompt(tok, model.cfg, f.prompt, f.image, f.video)
  start = time.perf_counter()
  out = generate(model, ids, pixels, max_new_tokens=f.max_new_tokens,
                 context_parallel=f.context_parallel and dist.is_initialized(),
                 temperature=f.temperature, top_p=f.top_p, top_k=f.top_k,
                 eos_id=tok.eos_id, seed=f.seed)
  seconds = time.perf_counter() - start
  if rank == 0:
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))
    world = dist.get_world_size() if dist.is_initialized() else 1
    print(f"[{ids.shape[1]} prompt tokens, {out.shape[1]} new, {seconds:.2f}s on {world} x "
          f"{device.type}]", flush=True)
  if dist.is_initialized():
    dist.destroy_process_group()


if __name__ == "__main__":
  from vita_jax import cli
  cli.run(main, flag_values=FLAGS)
