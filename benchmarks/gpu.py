"""Figure 7: attention kernels, the trainer, decode and vita_torch prefill on one GPU.

    python -m benchmarks.gpu [--smoke] [--out benchmarks/results] [--budget 480]

Writes `gpu-latest.json` and `gpu-latest.md` under --out. Meant to fit in about 8 minutes on one
H200; `--smoke` runs the same code on the CPU with trivially small shapes only to show that it
runs (its numbers mean nothing and no target is checked).

Every part runs in its own subprocess (`python -m benchmarks.gpu --part NAME --part-out F`):
JAX keeps its memory pool until the process ends, and the JAX and torch halves of the 1.5B
training comparison do not fit on the device side by side. A part writes its measurements to F
after each one, so a part that fails or runs out of time keeps what it finished; its error is
recorded and the other parts still run. The parent process never touches the device; it builds
the result rows from the parts' measurements.

Parts:
  attention_jax    fwd+bwd of causal attention (bf16, 16 query / 2 KV heads, head dim 128,
                   batch 1) at S = 8192 and 32768: our "jnp" and "pallas" kernels, both also
                   inside `ring_attention` on a one-device `seq` mesh, and cuDNN through
                   `jax.nn.dot_product_attention(implementation="cudnn")`
  attention_torch  the same through torch `scaled_dot_product_attention(is_causal, enable_gqa)`
  train_jax        our trainer's jitted step, Qwen2.5-1.5B text shape, B 2 x 8192, bf16 compute,
                   fp32 master weights, Adam
  train_torch      transformers Qwen2ForCausalLM, same shape, autocast bf16, sdpa, AdamW
  decode_jax       `vita_jax.generate` at batch 1, Qwen2.5-0.5B text shape, bf16 weights
  decode_torch     transformers `generate()` (greedy), same shape
  prefill_torch    vita_torch's decoder over a 32K prompt (1.5B text shape, bf16)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

FIGURE = "7 gpu"

# Dense bf16 peak FLOP/s and HBM bandwidth (B/s) by a substring of the device name (vendor specs).
DEVICE_SPECS = {
    "H200": dict(bf16_flops=989e12, hbm_bytes_per_s=4.8e12),
    "H100": dict(bf16_flops=989e12, hbm_bytes_per_s=3.35e12),
}

# Part name -> share of --budget it may use before it is stopped (a cap, not an expectation).
PARTS = {
    "attention_jax": 0.22,
    "attention_torch": 0.08,
    "train_jax": 0.24,
    "train_torch": 0.12,
    "decode_jax": 0.13,
    "decode_torch": 0.09,
    "prefill_torch": 0.12,
}

NOT_RUN = "not run (--only)"

FLOP_CONVENTION = (
    "Attention FLOPs: causal forward = 4 * S * S * H * D / 2 (QK^T and PV, H query heads, half "
    "the score matrix visible); forward + backward = 2.5 x that. Training FLOPs are model FLOPs "
    "(`vita_jax.training.flops.train_flops_per_step`: 3 x forward, remat not counted), MFU "
    "divides them by step time and the device's dense bf16 peak. The decode bound is HBM "
    "bandwidth / bytes of the LLM weights read per token (bf16; with tied embeddings the "
    "table is read once as the LM head).")


# ------------------------------------------------------------------------------- shapes

def attention_shape(smoke: bool) -> dict:
  if smoke:
    return dict(seqs=(64, 128), heads=4, kv_heads=2, dim=16, batch=1, jnp_chunk=32,
                pallas_blocks=(32, 16))
  return dict(seqs=(8192, 32768), heads=16, kv_heads=2, dim=128, batch=1, jnp_chunk=1024,
              pallas_blocks=(128, 64))


def llm_shape(name: str, smoke: bool) -> dict:
  """Qwen2.5 text shapes (tied embeddings, as the released 0.5B and 1.5B models)."""
  if smoke:
    return dict(vocab=2048, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tie=True)
  if name == "1.5b":
    return dict(vocab=151936, hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, tie=True)
  if name == "0.5b":
    return dict(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, tie=True)
  raise ValueError(name)


def train_shape(smoke: bool) -> tuple[int, int, int]:
  """(batch, seq_len, timed steps)."""
  return (1, 64, 1) if smoke else (2, 8192, 3)


def decode_shape(smoke: bool) -> tuple[int, int, int]:
  """(prompt tokens, new tokens, repeats)."""
  return (16, 64, 3) if smoke else (128, 128, 3)


def prefill_len(smoke: bool) -> int:
  return 256 if smoke else 32768


def device_spec(device_name: str) -> dict | None:
  for key, spec in DEVICE_SPECS.items():
    if key in device_name:
      return spec
  return None


def attention_flops(seq: int, heads: int, dim: int, batch: int) -> float:
  """Causal fwd+bwd FLOPs (see FLOP_CONVENTION)."""
  return 2.5 * batch * 4 * seq * seq * heads * dim / 2


# ------------------------------------------------------------------------------- part helpers

class Recorder:
  """A part's measurements, written to disk after every change (a timeout keeps them)."""

  def __init__(self, path: str):
    self.path = path
    self.data = {"values": {}, "notes": {}, "errors": {}}
    self.save()

  def set(self, section: str, key: str, value) -> None:
    self.data[section][key] = value
    self.save()

  def info(self, **kw) -> None:
    self.data.update(kw)
    self.save()

  def save(self) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f)
    os.replace(tmp, self.path)


def _short(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _jax_device(rec: Recorder, smoke: bool):
  import jax
  dev = jax.devices()[0]
  rec.info(device=dev.device_kind, platform=dev.platform)
  if not smoke and dev.platform != "gpu":
    raise RuntimeError(f"JAX runs on {dev.platform}, not a GPU; use --smoke on a CPU")
  return dev


def _torch_device(rec: Recorder, smoke: bool) -> str:
  import torch
  if torch.cuda.is_available():
    rec.info(device=torch.cuda.get_device_name(0), platform="gpu")
    return "cuda"
  if not smoke:
    raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (a CPU-only build?); the "
                       "torch baselines need a CUDA torch")
  rec.info(device="cpu", platform="cpu")
  return "cpu"


def _sync(device: str) -> None:
  import torch
  if device == "cuda":
    torch.cuda.synchronize()


def _model_config(shape: dict, smoke: bool):
  """A LongVITA model config whose decoder is `shape`; the vision tower is the tiny one and
  never runs (text-only batches)."""
  from configs import base
  from vita_jax.spec import model as spec_model
  from vita_jax.spec import tokens
  tiny = base.model_config("tiny")
  ids = (tokens.special_token_ids(tokens.DEMO_FIRST_VISUAL_ID, eos_id=2, pad_id=0) if smoke else
         tokens.special_token_ids(tokens.QWEN_FIRST_VISUAL_ID, eos_id=tokens.QWEN_EOS_ID,
                                  pad_id=tokens.QWEN_PAD_ID))
  llm = spec_model.llm_config(vocab=shape["vocab"], hidden=shape["hidden"],
                              layers=shape["layers"], heads=shape["heads"],
                              kv_heads=shape["kv_heads"], ffn=shape["ffn"], tie=shape["tie"],
                              max_positions=131_072)
  return spec_model.model_config(size="bench", vision=tiny.vision, llm=llm,
                                 projector_hidden=tiny.projector.hidden_size, max_tiles=4,
                                 tokens=ids)


def _hf_qwen2(size: str, smoke: bool, device: str, dtype, rows: int, length: int,
              max_len: int):
  """transformers' Qwen2ForCausalLM of the `size` shape (random init, seed 0) on `device` in
  `dtype`, and random input ids [rows, length] there."""
  import torch
  from transformers import Qwen2ForCausalLM
  shape = llm_shape(size, smoke)
  torch.manual_seed(0)
  with torch.device(device):
    model = Qwen2ForCausalLM(_qwen2_config(shape, max_len)).to(dtype)
  ids = torch.from_numpy(_random_ids(rows, length, shape["vocab"]).astype("int64")).to(device)
  return model, ids


def _qwen2_config(shape: dict, max_len: int):
  from transformers import Qwen2Config
  return Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                     intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
                     num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                     head_dim=shape["hidden"] // shape["heads"], rms_norm_eps=1e-6,
                     rope_theta=1e6, tie_word_embeddings=shape["tie"],
                     max_position_embeddings=max(4096, max_len), attn_implementation="sdpa",
                     bos_token_id=None, eos_token_id=None, pad_token_id=0)


def _random_ids(batch: int, seq: int, vocab: int, seed: int = 0):
  import numpy as np
  # Below the special/visual token ids of the Qwen vocabulary.
  return np.random.default_rng(seed).integers(10, min(vocab, 150_000), (batch, seq)).astype(
      np.int32)


# ------------------------------------------------------------------------------- parts

def part_attention_jax(rec: Recorder, smoke: bool) -> None:
  from vita_jax.parallel.mesh import make_mesh
  dev = _jax_device(rec, smoke)
  sh = attention_shape(smoke)
  on_gpu = dev.platform == "gpu"
  rec.set("notes", "baseline", "cuDNN via jax.nn.dot_product_attention(implementation='cudnn')"
          if on_gpu else "XLA jax.nn.dot_product_attention (implementation=None): no cuDNN on "
          f"{dev.platform}")
  mesh = make_mesh({"seq": 1}, [dev])
  for seq in sh["seqs"]:
    _attention_jax_at(rec, sh, seq, mesh, on_gpu, repeats=1 if smoke else 5)


def _attention_jax_at(rec: Recorder, sh: dict, seq: int, mesh, on_gpu: bool, repeats: int):
  import jax
  import jax.numpy as jnp

  from benchmarks.common import time_call
  from vita_jax.ops.attention import attention
  from vita_jax.ops.ring_attention import ring_attention
  b, h, hkv, d = sh["batch"], sh["heads"], sh["kv_heads"], sh["dim"]
  keys = jax.random.split(jax.random.key(seq), 4)
  q = jax.random.normal(keys[0], (b, seq, h, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, seq, hkv, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, seq, hkv, d), jnp.bfloat16)
  do = jax.random.normal(keys[3], (b, seq, h, d), jnp.bfloat16)
  seg = jnp.ones((b, seq), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))

  def build(name: str, chunk: int):
    if name == "cudnn":
      return lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn" if on_gpu else None)
    if name.startswith("ring_"):
      return lambda q, k, v: ring_attention(q, k, v, seg, pos, mesh=mesh, impl=name[5:],
                                            q_chunk=chunk, kv_chunk=chunk)
    return lambda q, k, v: attention(q, k, v, seg, pos, impl=name, q_chunk=chunk,
                                     kv_chunk=chunk)

  def fwd_bwd(fn):
    def run(q, k, v, do):
      _, vjp = jax.vjp(fn, q, k, v)
      return vjp(do)
    return jax.jit(run)

  # (name, tile candidates): a Pallas tile size that fails to lower falls back to the next;
  # the ring runs at the longest length only (its target is at S = 32K).
  cases = [("cudnn", (0,)), ("jnp", (sh["jnp_chunk"],)), ("pallas", sh["pallas_blocks"])]
  if seq == max(sh["seqs"]):
    cases += [("ring_jnp", (sh["jnp_chunk"],)), ("ring_pallas", sh["pallas_blocks"])]
  for name, chunks in cases:
    key = f"{name}@{seq}"
    failures = []
    for chunk in chunks:
      _log(f"  attention_jax {key} tiles {chunk}")
      step = fwd_bwd(build(name, chunk))
      try:
        times = time_call(lambda step=step: jax.block_until_ready(step(q, k, v, do)), repeats)
      except Exception as e:  # noqa: BLE001 - a kernel that does not lower is a result
        failures.append(f"tiles {chunk}: {_short(e)}")
        continue
      rec.set("values", key, dict(times=times, chunk=chunk, seq=seq, heads=h, dim=d, batch=b))
      break
    if failures:
      rec.set("errors" if key not in rec.data["values"] else "notes", key, "; ".join(failures))


def part_attention_torch(rec: Recorder, smoke: bool) -> None:
  device = _torch_device(rec, smoke)
  sh = attention_shape(smoke)
  for seq in sh["seqs"]:
    key = f"sdpa@{seq}"
    _log(f"  attention_torch {key}")
    try:
      rec.set("values", key, _sdpa_at(sh, seq, device, repeats=1 if smoke else 5))
    except Exception as e:  # noqa: BLE001
      rec.set("errors", key, _short(e))


def _sdpa_at(sh: dict, seq: int, device: str, repeats: int) -> dict:
  import torch
  import torch.nn.functional as F

  from benchmarks.common import time_call
  b, h, hkv, d = sh["batch"], sh["heads"], sh["kv_heads"], sh["dim"]
  gen = torch.Generator(device=device).manual_seed(seq)

  def new(heads):
    return torch.randn(b, heads, seq, d, device=device, dtype=torch.bfloat16, generator=gen)

  q, k, v = new(h).requires_grad_(), new(hkv).requires_grad_(), new(hkv).requires_grad_()
  do = new(h)

  def step():
    for t in (q, k, v):
      t.grad = None
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(do)
    _sync(device)

  return dict(times=time_call(step, repeats), seq=seq, heads=h, dim=d, batch=b)


def part_train_jax(rec: Recorder, smoke: bool) -> None:
  from benchmarks.fig_train import text_batch
  from configs import stage2
  from vita_jax.ops.attention import auto_impl
  from vita_jax.training import flops as flops_lib
  dev = _jax_device(rec, smoke)
  batch, seq, steps = train_shape(smoke)
  config = stage2.get_config("tiny")
  config.model = _model_config(llm_shape("1.5b", smoke), smoke)
  config.model.param_dtype, config.model.compute_dtype = "float32", "bfloat16"
  config.train.trainable = ("llm",)
  config.train.grad_accum = 1
  config.data.seq_len, config.data.global_batch_size = seq, batch
  flops = flops_lib.train_flops_per_step(config.model, batch=batch, seq_len=seq, tiles=0,
                                         trainable=("llm",))
  rec.info(model_flops=flops, tokens=batch * seq)
  data = text_batch(batch, seq, config.model.llm.vocab_size)
  # Attention: what impl="auto" picks here (the Pallas kernel on GPU, 128-token tiles), with
  # the jnp tiles of the model default as the fallback when it does not compile. Remat: none
  # (nothing recomputed), "dots" only when that runs out of device memory. (The memory model
  # is no guide here: with no seq sharding it assumes dense [S, S] scores, 285 GiB at this
  # shape, where the blockwise kernels keep none.)
  choices = [(auto_impl(), 32 if smoke else 128)]
  if choices[0][0] != "jnp":
    choices.append(("jnp", 32 if smoke else 1024))
  for impl, chunk in choices:
    config.model.attention.impl = impl
    config.model.attention.q_chunk = config.model.attention.kv_chunk = chunk
    for remat in ("none", "dots"):
      config.model.remat = remat
      _log(f"  train_jax: B={batch} S={seq} remat={remat} attention {impl}/{chunk}")
      try:
        times, loss = _train_steps(config, data, dev, steps)
      except Exception as e:  # noqa: BLE001 - record it, then try the next setting
        rec.set("errors", f"step@{impl}/{remat}", _short(e))
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
          continue
        break
      mem = (dev.memory_stats() or {}).get("peak_bytes_in_use")
      rec.set("values", "step", dict(times=times, impl=impl, chunk=chunk, remat=remat,
                                     loss=loss, peak_bytes=mem))
      return


def _train_steps(config, data, dev, steps: int) -> tuple[list[float], float]:
  """Step times of our trainer's jitted step (as figure 1 builds it) and the first loss."""
  import jax

  from benchmarks.common import time_call
  from benchmarks.fig_train import jax_setup
  _, step, state, frozen = jax_setup(config)
  batches = {k: jax.device_put(v[None], dev) for k, v in data.items()}
  holder = {"state": state}
  losses = []

  def run_step():
    holder["state"], metrics = step(holder["state"], frozen, batches)
    losses.append(float(metrics["loss"]))      # blocks until the step is done

  # Two warm-up steps: the second call compiles once more for committed outputs.
  return time_call(run_step, steps, warmup=2), losses[0]


def part_train_torch(rec: Recorder, smoke: bool) -> None:
  import torch

  from benchmarks.common import time_call
  device = _torch_device(rec, smoke)
  batch, seq, steps = train_shape(smoke)
  model, ids = _hf_qwen2("1.5b", smoke, device, torch.float32, batch, seq, seq)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.0)
  losses = []

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    losses.append(float(out.loss.detach()))   # also synchronises

  _log(f"  train_torch: B={batch} S={seq} (attn {model.config._attn_implementation})")
  times = time_call(step, steps, warmup=2)
  mem = torch.cuda.max_memory_allocated() if device == "cuda" else None
  rec.set("values", "step", dict(times=times, loss=losses[0], peak_bytes=mem,
                                 attn=model.config._attn_implementation))


def part_decode_jax(rec: Recorder, smoke: bool) -> None:
  import jax
  from flax import nnx

  from benchmarks.common import time_call
  from configs import stage2
  from vita_jax.generate import generate
  from vita_jax.train import build_model
  _jax_device(rec, smoke)
  prompt, new, repeats = decode_shape(smoke)
  shape = llm_shape("0.5b", smoke)
  config = stage2.get_config("tiny")
  config.model = _model_config(shape, smoke)
  config.model.param_dtype = config.model.compute_dtype = "bfloat16"
  model = build_model(config, None)
  params = jax.tree.leaves(nnx.state(model.llm, nnx.Param))
  weight_bytes = sum(p.size * p.dtype.itemsize for p in params)
  if not shape["tie"]:   # an untied embedding table is only gathered from, one row per token
    weight_bytes -= model.llm.embedding[...].size * model.llm.embedding[...].dtype.itemsize
  rec.info(weight_bytes=int(weight_bytes), prompt=prompt, new_tokens=new)
  ids = _random_ids(1, prompt, shape["vocab"])
  for n in (1, new):
    _log(f"  decode_jax: prompt {prompt}, {n} new")
    times = time_call(lambda n=n: jax.block_until_ready(generate(model, ids, max_new_tokens=n)),
                      repeats, warmup=1)
    rec.set("values", f"generate@{n}", dict(times=times))
  # generate's own split of one call: the decode loop alone, without the prefill.
  timings = {}
  jax.block_until_ready(generate(model, ids, max_new_tokens=new, timings=timings))
  rec.set("values", "loop", dict(decode_s=timings["decode_s"], tokens=timings["new_tokens"]))


def part_decode_torch(rec: Recorder, smoke: bool) -> None:
  import torch

  from benchmarks.common import time_call
  device = _torch_device(rec, smoke)
  prompt, new, repeats = decode_shape(smoke)
  model, ids = _hf_qwen2("0.5b", smoke, device, torch.bfloat16, 1, prompt, prompt + new)
  model.eval()

  def gen(n):
    def call():
      with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False)
      _sync(device)
      assert out.shape[1] == prompt + n, out.shape
    return call

  for n in (1, new):
    _log(f"  decode_torch: prompt {prompt}, {n} new")
    rec.set("values", f"generate@{n}", dict(times=time_call(gen(n), repeats, warmup=1)))


def part_prefill_torch(rec: Recorder, smoke: bool) -> None:
  import torch

  from benchmarks.common import time_call
  from vita_torch.model import LongVITAForCausalLM, dense_attention
  from vita_torch.ring import block_attention
  device = _torch_device(rec, smoke)
  seq = prefill_len(smoke)
  cfg = _model_config(llm_shape("1.5b", smoke), smoke)
  torch.manual_seed(0)
  with torch.device(device):
    model = LongVITAForCausalLM(cfg).to(torch.bfloat16).eval()
  ids = torch.from_numpy(_random_ids(1, seq, cfg.llm.vocab_size).astype("int64")).to(device)
  pos = torch.arange(seq, device=device)[None]
  seg = torch.ones_like(ids)
  paths = {
      # What LongVITAForCausalLM.forward runs: SDPA with an explicit [S, S] boolean mask.
      "dense": lambda _, q, k, v: dense_attention(q, k, v, seg, pos),
      # The ring's per-block kernel on the whole sequence: tiled einsum + softmax, fp32.
      "tiled": lambda _, q, k, v: block_attention(q, k, v, seg, pos, seg, pos,
                                                  impl="eager")[0].to(q.dtype),
      # The same block as one FlexAttention call (compiled into a fused kernel on CUDA).
      "flex": lambda _, q, k, v: block_attention(q, k, v, seg, pos, seg, pos,
                                                 impl="flex")[0].to(q.dtype),
  }
  for name, attend in paths.items():
    def prefill(attend=attend):
      with torch.inference_mode():
        hidden = model.decode(model.embed(ids), pos, attend)
        logits = model.logits(hidden[:, -1:])
      _sync(device)
      return logits

    _log(f"  prefill_torch: S={seq}, {name} attention")
    try:
      # The dense path runs first and warms CUDA up; the tiled one is slow and eager.
      times = time_call(prefill, 1 if smoke or name == "tiled" else 2,
                        warmup=0 if name == "tiled" else 1)
      rec.set("values", name, dict(times=times, seq=seq))
    except Exception as e:  # noqa: BLE001
      rec.set("errors", name, _short(e))
    if device == "cuda":
      torch.cuda.empty_cache()


PART_FNS = {
    "attention_jax": part_attention_jax,
    "attention_torch": part_attention_torch,
    "train_jax": part_train_jax,
    "train_torch": part_train_torch,
    "decode_jax": part_decode_jax,
    "decode_torch": part_decode_torch,
    "prefill_torch": part_prefill_torch,
}


# ------------------------------------------------------------------------------- rows

def _med(entry) -> float | None:
  from benchmarks.common import median
  return median(entry["times"]) if entry and entry.get("times") else None


def _ratio(a, b):
  return a / b if a is not None and b else None


def _why(*parts: dict, keys=()) -> str:
  """The errors of the parts (or of the given measurement keys) that left a row empty."""
  out = []
  for p in parts:
    if p.get("error"):
      out.append(p["error"])
    for k in keys:
      if k in p.get("errors", {}):
        out.append(f"{k}: {p['errors'][k]}")
  return "; ".join(out)


def attention_rows(parts: dict, smoke: bool, gpu: bool) -> list:
  from benchmarks.common import Row, check
  aj, at = parts["attention_jax"], parts["attention_torch"]
  sh = attention_shape(smoke)
  base_name = "cuDNN (jax.nn)" if gpu else "XLA jax.nn (CPU: no cuDNN)"
  rows = []

  def tflops(part, key):
    e = part.get("values", {}).get(key)
    t = _med(e)
    return (attention_flops(e["seq"], e["heads"], e["dim"], e["batch"]) / t / 1e12
            if t else None)

  shape = f"H={sh['heads']}/{sh['kv_heads']}, D={sh['dim']}, B={sh['batch']}, bf16, causal"
  for seq in sh["seqs"]:
    cudnn = tflops(aj, f"cudnn@{seq}")
    sdpa = tflops(at, f"sdpa@{seq}")
    ours = {}
    names = ["jnp", "pallas"] + (["ring_jnp", "ring_pallas"] if seq == max(sh["seqs"]) else [])
    for name in names:
      key = f"{name}@{seq}"
      value = ours[name] = tflops(aj, key)
      entry = aj.get("values", {}).get(key, {})
      ratio = _ratio(value, cudnn)
      ring = name.startswith("ring")
      label = (f"{name[5:]} kernel in ring_attention (1-device seq mesh)" if ring
               else f"{name} kernel (attention impl={name!r})")
      note = f"tiles {entry['chunk']}" if entry else ""
      extra = aj.get("notes", {}).get(key) or _why(aj, keys=(key, f"cudnn@{seq}"))
      if ring:
        note += ("; on one device attention(mesh=...) takes the local path, so this calls "
                 "ring_attention directly: one shard, no ppermute")
      if extra:
        note += f"; {extra}"
      rows.append(Row(FIGURE, f"attention fwd+bwd TFLOP/s, {label}, S={seq} ({shape})", value,
                      cudnn, base_name, ratio, ">= 0.7x cuDNN" if ring else "",
                      check(ratio, ">=", 0.7) if ring and gpu else None,
                      {"ours_s": entry.get("times", []),
                       "baseline_s": aj.get("values", {}).get(f"cudnn@{seq}", {}).get("times",
                                                                                      [])},
                      note.strip("; ")))
    best = max((v for v in ours.values() if v), default=None)
    best_name = next((n for n, v in ours.items() if v == best), "") if best else ""
    rows.append(Row(FIGURE, f"attention fwd+bwd TFLOP/s, best of ours ({best_name or 'none'}) "
                    f"vs torch SDPA, S={seq}", best, sdpa,
                    "torch SDPA (is_causal, enable_gqa)", _ratio(best, sdpa), "", None,
                    {"baseline_s": at.get("values", {}).get(f"sdpa@{seq}", {}).get("times", [])},
                    _why(at, keys=(f"sdpa@{seq}",)) or "torch picks its own SDPA backend"))
  return rows


def train_rows(parts: dict, smoke: bool, gpu: bool, spec: dict | None) -> list:
  from benchmarks.common import Row, check
  tj, tt = parts["train_jax"], parts["train_torch"]
  batch, seq, _ = train_shape(smoke)
  tokens = batch * seq
  ours_e, theirs_e = tj.get("values", {}).get("step"), tt.get("values", {}).get("step")
  t_ours, t_theirs = _med(ours_e), _med(theirs_e)
  ours_tps = tokens / t_ours if t_ours else None
  theirs_tps = tokens / t_theirs if t_theirs else None
  speedup = _ratio(ours_tps, theirs_tps)
  shape = ("tiny 2-layer text shape" if smoke else "Qwen2.5-1.5B text shape") + \
      f", B={batch} x S={seq}, bf16 compute, fp32 master, Adam"
  note = []
  if ours_e:
    note.append(f"ours: remat={ours_e['remat']}, attention {ours_e['impl']} tiles "
                f"{ours_e['chunk']}, first loss {ours_e['loss']:.3f}")
  if theirs_e:
    note.append(f"transformers: attn {theirs_e['attn']}, first loss {theirs_e['loss']:.3f}")
  for e in (ours_e, theirs_e):
    if e and e.get("peak_bytes"):
      note.append(f"peak memory {e['peak_bytes'] / 2**30:.1f} GiB")
  why = _why(tj, tt, keys=tuple(k for k in tj.get("errors", {}) if k.startswith("step@")))
  if why:
    note.append(why)
  rows = [Row(FIGURE, f"training tokens/s ({shape})", ours_tps, theirs_tps,
              "transformers Qwen2 + AdamW (autocast bf16, sdpa)", speedup, ">= 1.2x",
              check(speedup, ">=", 1.2) if gpu else None,
              {"ours_s": (ours_e or {}).get("times", []),
               "baseline_s": (theirs_e or {}).get("times", [])}, "; ".join(note))]
  flops = tj.get("model_flops")
  peak = spec["bf16_flops"] if spec else None
  mfu = flops / t_ours / peak if flops and t_ours and peak else None
  theirs_mfu = flops / t_theirs / peak if flops and t_theirs and peak else None
  mfu_note = (f"model FLOPs/step {flops:.3g}" if flops else "") + (
      f"; peak {peak / 1e12:.0f} TFLOP/s" if peak else
      "; n/a: no bf16 peak for this device in DEVICE_SPECS")
  rows.append(Row(FIGURE, "training MFU (model FLOPs / step time / dense bf16 peak)", mfu,
                  theirs_mfu, "transformers Qwen2 + AdamW", _ratio(mfu, theirs_mfu),
                  ">= 0.40 MFU", check(mfu, ">=", 0.40) if gpu else None, {},
                  mfu_note.strip("; ")))
  return rows


def decode_rows(parts: dict, smoke: bool, gpu: bool, spec: dict | None) -> list:
  from benchmarks.common import Row, check
  dj, dt = parts["decode_jax"], parts["decode_torch"]
  prompt, new, _ = decode_shape(smoke)

  def rate(part):
    t1 = _med(part.get("values", {}).get("generate@1"))
    tn = _med(part.get("values", {}).get(f"generate@{new}"))
    return (new - 1) / (tn - t1) if t1 and tn and tn > t1 else None

  ours, theirs = rate(dj), rate(dt)
  reps = {f"{side}_{n}_tokens_s": p.get("values", {}).get(f"generate@{n}", {}).get("times", [])
          for side, p in (("ours", dj), ("hf", dt)) for n in (1, new)}
  shape = "tiny 2-layer text shape" if smoke else "Qwen2.5-0.5B text shape"
  how = (f"{shape}, bf16, prompt {prompt}, {new} greedy tokens, random weights (not the same "
         f"on both sides); rate = {new - 1} / (time({new} tokens) - time(1 token))")
  loop = dj.get("values", {}).get("loop")
  if loop and loop["decode_s"] > 0:
    how += (f"; ours, decode loop alone (generate's timings): "
            f"{(loop['tokens'] - 1) / loop['decode_s']:.1f} tokens/s")
  why = _why(dj, dt)
  rows = [Row(FIGURE, "decode tokens/s (batch 1)", ours, theirs, "transformers generate()",
              _ratio(ours, theirs), "", None, reps, how + (f"; {why}" if why else ""))]
  wbytes = dj.get("weight_bytes")
  bound = spec["hbm_bytes_per_s"] / wbytes if spec and wbytes else None
  frac = _ratio(ours, bound)
  note = (f"bound = {spec['hbm_bytes_per_s'] / 1e12:.2f} TB/s / {wbytes / 1e9:.3f} GB of LLM "
          "weights" if bound else "bound n/a: no HBM bandwidth for this device in DEVICE_SPECS")
  rows.append(Row(FIGURE, "decode tokens/s vs the memory-bandwidth bound (batch 1)", ours,
                  bound, "HBM bandwidth / weight bytes", frac, ">= 0.40 of bound",
                  check(frac, ">=", 0.40) if gpu else None, {}, note))
  return rows


def prefill_rows(parts: dict, smoke: bool) -> list:
  from benchmarks.common import Row
  pt = parts["prefill_torch"]
  seq = prefill_len(smoke)
  shape = "tiny 2-layer text shape" if smoke else "1.5B text shape"
  rows = []
  labels = {"dense": "eager path (model.forward's dense_attention: SDPA + [S,S] bool mask)",
            "tiled": "ring block kernel, eager (block_attention impl=eager: tiled, fp32)"}
  for name, label in labels.items():
    entry = pt.get("values", {}).get(name)
    t = _med(entry)
    rows.append(Row(FIGURE, f"vita_torch prefill tokens/s, S={seq}, {label}",
                    seq / t if t else None, None, "", None, "", None,
                    {"ours_s": (entry or {}).get("times", [])},
                    f"{shape}, bf16, batch 1, logits at the last token only" +
                    (f"; {_why(pt, keys=(name,))}" if _why(pt, keys=(name,)) else "")))
  flex, tiled = pt.get("values", {}).get("flex"), pt.get("values", {}).get("tiled")
  tf, tt = _med(flex), _med(tiled)
  rows.append(Row(FIGURE, f"vita_torch prefill tokens/s, S={seq}, ring block kernel fused "
                  "(block_attention impl=flex: FlexAttention, compiled on CUDA)",
                  seq / tf if tf else None, seq / tt if tt else None, "the eager tiles",
                  _ratio(tt, tf), "", None, {"ours_s": (flex or {}).get("times", [])},
                  f"{shape}, bf16, batch 1; on CPU FlexAttention runs unfused" +
                  (f"; {_why(pt, keys=('flex',))}" if _why(pt, keys=("flex",)) else "")))
  return rows


GROUPS = {  # figure group -> (parts it reads, row builder)
    "attention": (("attention_jax", "attention_torch"), "attention"),
    "train": (("train_jax", "train_torch"), "train"),
    "decode": (("decode_jax", "decode_torch"), "decode"),
    "prefill_torch": (("prefill_torch",), "prefill"),
}


def build_figures(parts: dict, smoke: bool) -> tuple[dict, str]:
  """-> ({group: {"rows": [...]}} or {"error": ...}, device name)."""
  device = next((p["device"] for p in parts.values()
                 if p.get("device") and p.get("platform") == "gpu"), None) or \
      next((p["device"] for p in parts.values() if p.get("device")), "unknown")
  gpu = any(p.get("platform") == "gpu" for p in parts.values())
  spec = device_spec(device) if gpu else None
  builders = {"attention": lambda: attention_rows(parts, smoke, gpu),
              "train": lambda: train_rows(parts, smoke, gpu, spec),
              "decode": lambda: decode_rows(parts, smoke, gpu, spec),
              "prefill": lambda: prefill_rows(parts, smoke)}
  figures = {}
  for group, (names, builder) in GROUPS.items():
    if all(parts[n].get("error") == NOT_RUN for n in names):
      continue
    if all(parts[n].get("error") and not parts[n].get("values") for n in names):
      figures[group] = {"error": "; ".join(f"{n}: {parts[n]['error']}" for n in names)}
      continue
    try:
      figures[group] = {"rows": [r.to_json() for r in builders[builder]()]}
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      figures[group] = {"error": f"building rows: {_short(e)}"}
  return figures, device


# ------------------------------------------------------------------------------- driver

def run_part(name: str, smoke: bool, timeout: float, scratch: str) -> dict:
  """Run one part in a subprocess; -> its measurements plus seconds and error (if any)."""
  out = os.path.join(scratch, f"{name}.json")
  cmd = [sys.executable, "-m", "benchmarks.gpu", "--part", name, "--part-out", out]
  env = dict(os.environ)
  if smoke:
    cmd.append("--smoke")
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  else:
    # The part is alone on the device: let JAX's pool take most of it.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  start = time.perf_counter()
  error = None
  try:
    proc = subprocess.run(cmd, cwd=root, env=env, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    sys.stderr.write(proc.stdout[-4000:])
    if proc.returncode:
      lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
      error = f"exit {proc.returncode}: " + (lines[-1][:300] if lines else "no output")
  except subprocess.TimeoutExpired as e:
    out_text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    sys.stderr.write(out_text[-4000:])
    error = f"timed out after {timeout:.0f} s (results finished before that are kept)"
  result = {}
  if os.path.exists(out):
    with open(out) as f:
      result = json.load(f)
  if error:
    result["error"] = error
  result["seconds"] = round(time.perf_counter() - start, 1)
  return result


def markdown(result: dict) -> str:
  from benchmarks import report
  lines = [report.markdown(result), "Conventions: " + FLOP_CONVENTION, "",
           "| part | device | seconds | status |", "|---|---|---|---|"]
  for name, p in result["parts"].items():
    status = p.get("error") or "ok"
    errors = p.get("errors") or {}
    if errors:
      status += "; " + "; ".join(f"{k}: {v[:120]}" for k, v in errors.items())
    lines.append(f"| {name} | {p.get('device', '?')} | {p.get('seconds')} | "
                 f"{status.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="CPU, trivial shapes (tests only)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--name", default="gpu-latest", help="output file stem")
  parser.add_argument("--budget", type=float, default=480.0,
                      help="seconds for all parts together (each part gets a share)")
  parser.add_argument("--only", default="", help=f"comma list of {','.join(PARTS)}")
  parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
  parser.add_argument("--part-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.part:   # a child: run one part, write its measurements
    rec = Recorder(args.part_out)
    started = time.perf_counter()
    try:
      PART_FNS[args.part](rec, args.smoke)
    finally:
      rec.info(part_seconds=round(time.perf_counter() - started, 1))
    return 0

  from benchmarks.common import load_average, machine_info
  names = [n for n in args.only.split(",") if n] or list(PARTS)
  unknown = [n for n in names if n not in PARTS]
  if unknown:
    parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
  started = time.perf_counter()
  result = dict(mode="smoke" if args.smoke else "full",
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                repeats="1 (smoke)" if args.smoke else "3-5", machine=machine_info(),
                load_average_start=load_average(), budget_s=args.budget)
  parts = {}
  with tempfile.TemporaryDirectory(prefix="vita_gpu_bench_") as scratch:
    for name in PARTS:
      if name not in names:
        parts[name] = {"error": NOT_RUN}
        continue
      timeout = 600.0 if args.smoke else max(30.0, PARTS[name] * args.budget)
      _log(f"[gpu] {name} (cap {timeout:.0f} s) ...")
      parts[name] = run_part(name, args.smoke, timeout, scratch)
      _log(f"[gpu] {name}: {parts[name].get('error') or 'ok'} in {parts[name]['seconds']} s")
  figures, device = build_figures(parts, args.smoke)
  result["machine"]["jax_devices"] = f"1 x {device}"
  result["figures"] = figures
  result["parts"] = parts
  result["load_average_end"] = load_average()
  result["total_seconds"] = round(time.perf_counter() - started, 1)

  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, f"{args.name}.json")
  with open(json_path, "w") as f:
    json.dump(_finite(result), f, indent=1, allow_nan=False)
  md_path = os.path.join(args.out, f"{args.name}.md")
  text = markdown(result)
  with open(md_path, "w") as f:
    f.write(text)
  print(text)
  _log(f"wrote {json_path} and {md_path} in {result['total_seconds']} s")
  return 0 if all("error" not in parts[n] for n in names) else 1


def _finite(x):
  """`x` with every NaN or infinity replaced by None (strict JSON)."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


if __name__ == "__main__":
  sys.exit(main())
