"""Figure 6: `vita_torch` vs `vita_jax` forward time on CPU, same checkpoint, same inputs.

The `small` checkpoint (internvl layout, fp32) is loaded by both; the input is one text row
with image tiles whose visual context tokens sit near its start, so the vision tower, the
projector and the LLM all run. JAX: the model's forward jitted over its split state;
torch: `model(input_ids, pixel_values=...)` under `torch.inference_mode()`.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import Context, Row, median, time_call
from benchmarks.fig_generate import write_checkpoint

FIGURE = "6 torch mirror"


def shapes(ctx: Context) -> tuple[str, int, int]:
  """(size, sequence length, tiles)."""
  if ctx.smoke:
    return "tiny", 64, 1
  return ("small", 512, 2) if ctx.quick else ("small", 2048, 6)


def run(ctx: Context) -> list[Row]:
  import jax
  import torch
  from flax import nnx

  import vita_jax
  import vita_torch
  from vita_jax.spec.tokens import tokens_per_tile
  size, seq, tiles = shapes(ctx)
  path = write_checkpoint(size, ctx.scratch)
  ours = vita_jax.load_pretrained(path, dtype="float32")
  theirs = vita_torch.load_pretrained(path, dtype=torch.float32, device="cpu")
  cfg = ours.config
  rng = np.random.default_rng(0)
  ids = rng.integers(10, min(2000, cfg.llm.vocab_size), (1, seq)).astype(np.int32)
  n_ctx = tiles * tokens_per_tile(cfg)
  ids[0, 2:2 + n_ctx] = ours.context_ids[0]
  side = cfg.vision.image_size
  pixels = rng.standard_normal((tiles, side, side, 3)).astype(np.float32)

  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda st, i, p: nnx.merge(graphdef, st)(i, pixel_values=p))
  dev_ids, dev_px = jax.device_put(ids), jax.device_put(pixels)
  ids_t = torch.from_numpy(ids.astype(np.int64))
  px_t = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

  def torch_forward():
    with torch.inference_mode():
      return theirs(ids_t, pixel_values=px_t)

  jax_logits = np.asarray(forward(state, dev_ids, dev_px))
  torch_logits = torch_forward().float().numpy()
  delta = float(np.abs(jax_logits - torch_logits).max())
  ctx.log(f"  torch_mirror: {size}, S={seq}, {tiles} tiles; max |logit delta| {delta:.1e}")
  t_jax = time_call(lambda: jax.block_until_ready(forward(state, dev_ids, dev_px)), ctx.repeats)
  t_torch = time_call(torch_forward, ctx.repeats)
  return [Row(FIGURE, f"forward ms ({size}, S={seq}, {tiles} tiles, fp32, CPU)",
              1e3 * median(t_jax), 1e3 * median(t_torch), "vita_torch (eager)",
              median(t_torch) / median(t_jax), "", None,
              {"ours_s": t_jax, "baseline_s": t_torch},
              f"same checkpoint and inputs; max |logit delta| {delta:.1e}")]
