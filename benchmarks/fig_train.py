"""Figure 1: training throughput and MFU of the `small` text shape, vita_jax vs transformers.

Both sides train the same Qwen2 text model (hidden 512, 8 layers, 8/2 heads, FFN 1408, vocab
32000) with the same weights (ours saved in the `internvl` layout, renamed into a
`Qwen2ForCausalLM`), the same batch, fp32 and Adam + grad clipping. Ours is the trainer's own
jitted step (`train_step.make_train_step`); theirs is a plain PyTorch loop: forward with
labels, backward, `clip_grad_norm_`, `AdamW.step`. MFU divides the model FLOPs by the step time
and by each framework's own 2048^2 fp32 matmul rate measured in the same run.
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.common import (
  Context,
  Row,
  check,
  jax_matmul_peak,
  median,
  time_call,
  torch_matmul_peak,
)

FIGURE = "1 train"


def shapes(ctx: Context) -> tuple[str, int, int]:
  """(model size, batch, seq_len)."""
  if ctx.smoke:
    return "tiny", 1, 64
  return ("small", 2, 512) if ctx.quick else ("small", 4, 1024)


def text_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, vocab, (batch, seq)).astype(np.int32)
  labels = np.roll(ids, -1, axis=1)
  labels[:, -1] = -100
  pos = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()
  return dict(input_ids=ids, labels=labels, positions=pos, segment_ids=np.ones_like(ids))


def _config(size: str, batch: int, seq: int):
  from configs import stage2
  config = stage2.get_config(size)
  config.model.compute_dtype = "float32"
  config.model.remat = "none"
  config.train.trainable = ("llm",)          # text only: the vision tower does no work
  config.train.grad_accum = 1
  config.train.peak_tflops_per_device = 1.0
  config.data.seq_len = seq
  config.data.global_batch_size = batch
  # Attention tiles of at most half the sequence, as docs/training.md#how-to-choose-shards
  # advises for short sequences: a causal tile that covers the whole sequence can never be
  # skipped (the default 1024-token tiles are sized for long ones). 8.27 -> 7.87 s per step at
  # 4 x 1024 (same-process A/B).
  tile = min(int(config.model.attention.q_chunk), max(seq // 2, 1))
  config.model.attention.q_chunk = config.model.attention.kv_chunk = tile
  return config


def jax_setup(config):
  """-> (model, step(state) -> state, state, frozen, first-step loss fn)."""
  import jax

  from vita_jax.parallel.mesh import make_mesh
  from vita_jax.train import build_model
  from vita_jax.training import optim
  from vita_jax.training import step as train_step
  from vita_jax.training.state import initial_state, split_model
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  model = build_model(config, mesh)
  split, params, frozen = split_model(model, tuple(config.train.trainable))
  tx, schedule = optim.make_optimizer(params, split.trainable_axes, config.train)
  state = initial_state(tx, params)
  step = jax.jit(train_step.make_train_step(split, tx, schedule, config), donate_argnums=(0,))
  return model, step, state, frozen


def torch_qwen2_from(model, config, scratch: str):
  """A transformers Qwen2ForCausalLM holding exactly `model`'s LLM weights."""
  import torch
  from safetensors.torch import load_file
  from transformers import Qwen2Config, Qwen2ForCausalLM

  import vita_jax
  path = os.path.join(scratch, f"train_{config.model.size}_internvl")
  vita_jax.save_pretrained(model, path, layout="internvl")
  t = config.model.llm
  cfg = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                    intermediate_size=t.ffn_dim, num_hidden_layers=t.num_layers,
                    num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                    head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                    tie_word_embeddings=bool(t.tie_embeddings),
                    max_position_embeddings=max(4096, config.data.seq_len))
  qwen = Qwen2ForCausalLM(cfg)
  state = {}
  for name in os.listdir(path):
    if name.endswith(".safetensors"):
      state.update(load_file(os.path.join(path, name)))
  # On disk transformers 5 writes InternVL's text model under the llava names.
  renamed = {k[len("language_model."):]: v for k, v in state.items()
             if k.startswith("language_model.")}
  missing, unexpected = qwen.load_state_dict(renamed, strict=False)
  missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
  if missing or unexpected:
    raise RuntimeError(f"weight conversion: missing {missing[:4]}, unexpected {unexpected[:4]}")
  return qwen.to(torch.float32).train()


def run(ctx: Context) -> list[Row]:
  import jax
  import torch

  from vita_jax.training import flops as flops_lib
  size, batch, seq = shapes(ctx)
  config = _config(size, batch, seq)
  data = text_batch(batch, seq, config.model.llm.vocab_size)
  tokens = batch * seq
  model_flops = flops_lib.train_flops_per_step(config.model, batch=batch, seq_len=seq, tiles=0,
                                               trainable=("llm",))

  model, step, state, frozen = jax_setup(config)
  qwen = torch_qwen2_from(model, config, ctx.scratch)
  del model
  batches = {k: jax.device_put(v[None], jax.devices()[0]) for k, v in data.items()}
  holder = {"state": state}

  def jax_step():
    holder["state"], metrics = step(holder["state"], frozen, batches)
    jax.block_until_ready(metrics["loss"])
    holder.setdefault("loss", float(metrics["loss"]))

  ctx.log(f"  train: {size} B={batch} S={seq}; compiling the JAX step")
  # Two warm-up steps: the first step's outputs are committed arrays, so the second call
  # compiles once more for them; every later step reuses that program.
  jax_peak = jax_matmul_peak()
  jax_times = time_call(jax_step, ctx.repeats, warmup=2)

  tc = config.train
  opt = torch.optim.AdamW(qwen.parameters(), lr=float(tc.peak_lr), betas=(tc.b1, tc.b2),
                          eps=tc.eps, weight_decay=0.0)
  ids = torch.from_numpy(data["input_ids"].astype(np.int64))
  torch_loss = {}

  def torch_step():
    opt.zero_grad(set_to_none=True)
    out = qwen(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(qwen.parameters(), float(tc.grad_clip))
    opt.step()
    torch_loss.setdefault("loss", float(out.loss.detach()))

  torch_peak = torch_matmul_peak()
  torch_times = time_call(torch_step, ctx.repeats, warmup=1)
  # Peaks are sampled before and after the steps and the best is used: background load can
  # only lower a sample, and a lower peak would flatter the MFU.
  jax_peak += jax_matmul_peak()
  torch_peak += torch_matmul_peak()

  ours_tps, theirs_tps = tokens / median(jax_times), tokens / median(torch_times)
  ours_mfu = model_flops / median(jax_times) / max(jax_peak)
  theirs_mfu = model_flops / median(torch_times) / max(torch_peak)
  tile = int(config.model.attention.q_chunk)
  loss_note = (f"first-step loss {holder['loss']:.4f} (ours) vs {torch_loss['loss']:.4f} "
               f"(transformers): same weights and batch; our attention tiles {tile} (half the "
               "sequence), transformers' SDPA picks its own blocks")
  shape = f"{size} text, B={batch} x S={seq}, fp32"
  speedup = ours_tps / theirs_tps
  return [
      Row(FIGURE, f"training tokens/s ({shape})", ours_tps, theirs_tps,
          "transformers + torch AdamW", speedup, ">= 1.2x", check(speedup, ">=", 1.2),
          {"ours_s": jax_times, "baseline_s": torch_times}, loss_note),
      Row(FIGURE, "training MFU (model FLOPs / step time / own 2048^2 matmul peak)", ours_mfu,
          theirs_mfu, "transformers + torch AdamW", ours_mfu / theirs_mfu, ">= 0.60 MFU",
          check(ours_mfu, ">=", 0.60),
          {"jax_peak_flops": jax_peak, "torch_peak_flops": torch_peak},
          f"model FLOPs/step {model_flops:.3g}; best peaks {max(jax_peak) / 1e9:.0f} (JAX) and "
          f"{max(torch_peak) / 1e9:.0f} (torch) GFLOP/s"),
  ]
