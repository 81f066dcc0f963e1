"""Figure 2: prefill and decode tokens/s, `vita_jax.generate` vs transformers' `generate()`.

One random `small` checkpoint is written by `vita_jax.save_pretrained(layout="internvl")` and
loaded by both `vita_jax.load_pretrained` and transformers' `InternVLForConditionalGeneration`
(fp32, greedy, text prompt, EOS disabled so both produce exactly N tokens). Both sides are timed
the same way: `generate` with 1 new token is the prefill; decode speed is
(N - 1) / (time(N tokens) - time(1 token)).
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.common import Context, Row, check, median, time_call

FIGURE = "2 generate"


def shapes(ctx: Context) -> tuple[str, int, int]:
  """(size, prompt tokens, new tokens)."""
  if ctx.smoke:
    return "tiny", 16, 4
  return ("small", 128, 32) if ctx.quick else ("small", 512, 64)


def write_checkpoint(size: str, scratch: str) -> str:
  import vita_jax
  from configs import stage2
  from vita_jax.train import build_model
  config = stage2.get_config(size)
  config.model.compute_dtype = "float32"
  path = os.path.join(scratch, f"{size}_internvl")
  if not os.path.exists(os.path.join(path, "config.json")):
    vita_jax.save_pretrained(build_model(config, None), path, layout="internvl")
  return path


def run(ctx: Context) -> list[Row]:
  import jax
  import torch
  from transformers import InternVLForConditionalGeneration

  import vita_jax
  from vita_jax.generate import generate
  size, prompt_len, new = shapes(ctx)
  path = write_checkpoint(size, ctx.scratch)
  ours = vita_jax.load_pretrained(path, dtype="float32")
  hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  vocab = ours.config.llm.vocab_size
  ids = np.random.default_rng(0).integers(10, min(vocab, 1000), (1, prompt_len)).astype(np.int32)
  ids_t = torch.from_numpy(ids.astype(np.int64))

  def jax_gen(n):
    return lambda: jax.block_until_ready(generate(ours, ids, max_new_tokens=n))

  def hf_gen(n):
    def call():
      with torch.no_grad():
        return hf.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return call

  ctx.log(f"  generate: {size}, prompt {prompt_len}, {new} new tokens")
  same = np.array_equal(np.asarray(jax_gen(new)()), hf_gen(new)()[:, prompt_len:].numpy())
  times = {}
  for name, fn in (("ours", jax_gen), ("hf", hf_gen)):
    times[name, 1] = time_call(fn(1), ctx.repeats, warmup=1)
    times[name, new] = time_call(fn(new), ctx.repeats, warmup=1)

  def rates(name):
    t1, tn = median(times[name, 1]), median(times[name, new])
    # At trivial sizes the difference can drown in noise: no rate rather than a wild one.
    return prompt_len / t1, ((new - 1) / (tn - t1) if tn > 1.05 * t1 else None)

  (ours_pre, ours_dec), (hf_pre, hf_dec) = rates("ours"), rates("hf")
  speedup = ours_dec / hf_dec if ours_dec and hf_dec else None
  reps = {f"{n}_{k}_tokens_s": times[n, k] for n in ("ours", "hf") for k in (1, new)}
  note = (f"{size} checkpoint (fp32, internvl layout), prompt {prompt_len}, {new} greedy "
          f"tokens; identical tokens: {same}")
  return [
      Row(FIGURE, f"prefill tokens/s (prompt {prompt_len})", ours_pre, hf_pre,
          "transformers generate()", ours_pre / hf_pre, "", None, reps, note),
      Row(FIGURE, "decode tokens/s (batch 1)", ours_dec, hf_dec, "transformers generate()",
          speedup, ">= 2x", check(speedup, ">=", 2.0)),
  ]
