"""Figure 5: the longest prompt the tiny model prefills over 8 sequence shards within a memory
budget, and the time per token at that length.

Memory: XLA's `memory_analysis()` of the compiled sharded prefill (arguments + outputs +
temporaries per device, times 8 devices, since the fake CPU devices share the host's RAM),
doubling the prompt until it exceeds the budget (half of the RAM available at the start) or
the search cap. Time: `vita_jax.generate.prefill` run at the longest length that fits, capped
so the run stays within minutes on this machine (the cap is reported when it binds).
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import Context, Row, available_memory_bytes, median, time_call

FIGURE = "5 long prefill"
SHARDS = 8


def caps(ctx: Context) -> tuple[int, int, int]:
  """(first length tried, largest length the memory search tries, largest length run)."""
  if ctx.smoke:
    return 256, 1024, 512
  return (4096, 131_072, 8192) if ctx.quick else (4096, 1_048_576, 65_536)


def tiny_model():
  from configs import stage2
  from vita_jax.train import build_model
  config = stage2.get_config("tiny")
  config.model.compute_dtype = "float32"
  return build_model(config, None)


def prefill_bytes(model, length: int) -> int:
  """Per-device bytes (arguments + outputs + temporaries) of the compiled prefill program."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from vita_jax import generate as gen
  runner = gen._runner(model, SHARDS)
  state = runner.state(model)
  seq = NamedSharding(runner.mesh, P(None, "seq"))
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=seq)
  last = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=NamedSharding(runner.mesh, P()))
  lowered = runner.prefill.lower(state, ids, ids, None, ids, ids, last, new_len=16)
  mem = lowered.compile().memory_analysis()
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
             mem.alias_size_in_bytes)


def run(ctx: Context) -> list[Row]:
  import jax

  from vita_jax.generate import prefill
  first, search_cap, run_cap = caps(ctx)
  budget = available_memory_bytes() // 2
  model = tiny_model()
  length, fits, per_device = first, 0, {}
  while length <= search_cap:
    per_device[length] = prefill_bytes(model, length)
    if per_device[length] * SHARDS > budget:
      break
    fits = length
    ctx.log(f"  long_prefill: {length} tokens -> {per_device[length] * SHARDS / 2**30:.2f} GiB")
    length *= 2
  run_len = min(fits, run_cap)
  ids = np.random.default_rng(0).integers(10, 2000, (1, run_len)).astype(np.int32)
  ctx.log(f"  long_prefill: timing a {run_len}-token prefill over {SHARDS} shards")
  call = lambda: jax.block_until_ready(prefill(model, ids, seq_shards=SHARDS)[0])
  times = time_call(call, 1 if ctx.quick else min(ctx.repeats, 2))
  bound = "memory budget" if fits < search_cap else f"search cap {search_cap}"
  gib = {k: round(v * SHARDS / 2**30, 3) for k, v in per_device.items()}
  return [
      Row(FIGURE, f"longest prompt within {budget / 2**30:.1f} GiB (tokens, tiny, "
          f"{SHARDS} shards)", float(fits), None, "", None, "", None, {"GiB_by_length": [gib]},
          f"bound by the {bound}; total compiled-program memory by length (GiB): {gib}"),
      Row(FIGURE, f"prefill ms per token at {run_len} tokens", 1e3 * median(times) / run_len,
          None, "", None, "", None, {"prefill_s": times},
          f"{run_len / median(times):,.0f} tokens/s; timed length capped at {run_cap}"
          if run_len < fits else f"{run_len / median(times):,.0f} tokens/s"),
  ]
