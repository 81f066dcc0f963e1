"""Figure 7: continuous batching in the server's engine (vita_jax.serving.engine).

A random `tiny` model (fp32) behind the engine with 8 slots, text prompts of ~20 tokens,
greedy, EOS ignored so every request makes exactly N tokens. Measured from the engine's own
per-token events, in process (no HTTP): aggregate decode tokens/s with 8 concurrent streams
against 1 stream (decode = the tokens after each request's first, over the time from the last
first token to the last token), time to first token (submit -> first token: queue, prefill,
insert) and per-token latency (gap between two tokens of one request), p50 / p99, at
concurrency 1 and 8. Each concurrency runs `repeats` rounds after a warm-up round.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from benchmarks.common import Context, Row, check

FIGURE = "7 serve"


def _round(engine, requests):
  """Submit all at once -> per request: (submit time, [time of token i])."""
  stamps, done = [[] for _ in requests], threading.Event()
  left = [len(requests)]
  lock = threading.Lock()

  def on_event(i):
    def call(event):
      stamps[i].append(time.perf_counter())
      if event.finish_reason:
        with lock:
          left[0] -= 1
          if left[0] == 0:
            done.set()
    return call

  start = time.perf_counter()
  for i, r in enumerate(requests):
    engine.submit(r, on_event(i))
  if not done.wait(600):
    raise TimeoutError("the engine did not finish a benchmark round in 600 s")
  return start, stamps


def run(ctx: Context) -> list[Row]:
  from flax import nnx

  from configs import base
  from vita_jax.data.demo import ensure_demo_data
  from vita_jax.data.tokenizer import load_tokenizer
  from vita_jax.models.vlm import LongVITA
  from vita_jax.serving.engine import Engine, Request
  new = 8 if ctx.smoke else 32 if ctx.quick else 64
  cfg = base.model_config("tiny")
  cfg.compute_dtype, cfg.remat = "float32", "none"
  model = LongVITA(cfg, rngs=nnx.Rngs(0))
  tok = load_tokenizer(ensure_demo_data() + "/tokenizer")
  engine = Engine(model, tok, max_batch=8, max_queue=8, max_prompt_len=32,
                  max_new_tokens=new).start()
  rng = np.random.default_rng(0)

  def requests(c):
    return [Request(rng.integers(30, 2000, (1, 20)).astype(np.int32), max_tokens=new,
                    ignore_eos=True) for _ in range(c)]

  ctx.log(f"  serve: tiny, prompt 20, {new} tokens per request, 8 slots")
  stats = {}
  try:
    for c in (1, 8):
      _round(engine, requests(c))                           # warm-up (compiles the bucket)
      rates, ttft, gaps = [], [], []
      for _ in range(ctx.repeats):
        start, stamps = _round(engine, requests(c))
        firsts = [s[0] for s in stamps]
        rates.append(sum(len(s) - 1 for s in stamps) / (max(s[-1] for s in stamps) -
                                                        max(firsts)))
        ttft += [f - start for f in firsts]
        gaps += [b - a for s in stamps for a, b in zip(s, s[1:])]
      stats[c] = dict(rates=rates, ttft=ttft, gaps=gaps)
  finally:
    engine.shutdown()
  rate = {c: float(np.median(stats[c]["rates"])) for c in stats}
  ratio = rate[8] / rate[1]
  rows = [Row(FIGURE, "aggregate decode tokens/s, 8 streams", rate[8], rate[1], "1 stream",
              ratio, ">= 4x", check(ratio, ">=", 4.0),
              {"8_streams": stats[8]["rates"], "1_stream": stats[1]["rates"]},
              f"tiny fp32, 8 slots, prompt 20, {new} greedy tokens each, in process")]
  for c in (1, 8):
    for name, key, scale, unit in (("time to first token", "ttft", 1.0, "s"),
                                   ("per-token latency", "gaps", 1e3, "ms")):
      values = np.asarray(stats[c][key]) * scale
      for q in (50, 99):
        rows.append(Row(FIGURE, f"{name} p{q} ({unit}), concurrency {c}",
                        float(np.percentile(values, q)),
                        note=f"{len(values)} samples"))
  return rows
