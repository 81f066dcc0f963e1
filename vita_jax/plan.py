"""Plan a run before booking the machines: per-device memory, step FLOPs, the mesh that fits.

    python -m vita_jax.plan --config=configs/stage4.py                      # smallest mesh
    python -m vita_jax.plan --config=configs/stage3.py --devices=64 --device=h100
    python -m vita_jax.plan --config=configs/stage2.py:tiny --mesh=fsdp:4,seq:2 --check
    python -m vita_jax.plan --config=configs/stage4.py --serve --prompt_len=1047552 \
        --max_new_tokens=1024 --device=h100                              # serving a long prompt
    python -m vita_jax.plan --config=configs/stage4.py:tiny --serve --prompt_len=8192 \
        --mesh=seq:2,tensor:4 --check

Prints the per-device breakdown (master params, gradients, Adam moments, activations under
`model.remat`, attention tiles, LM-head chunk, vision tower) for the given or best mesh, says
whether it fits in `--hbm_gb`, and if not which smallest mesh does. `--check` compiles the real
train step on this machine's (fake) devices and prints XLA's `memory_analysis()` next to the
prediction.

With `--serve` the same for `vita_jax.generate` serving a prompt: weights, KV cache and prefill
activations per device on a generation mesh (seq x fsdp x tensor, as `--seq_shards`,
`--fsdp_shards` and `--tensor_shards` build it), and with `--check` the compiled
`decoding.prefill_step` next to it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Iterator

import ml_collections
from absl import flags

from vita_jax import cli
from vita_jax.errors import ConfigError
from vita_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from vita_jax.training import memory_model, validation

GIB = 1024 ** 3
# name: (HBM GiB per device, dense bf16 peak TFLOP/s per device)
DEVICES = {
    "tpu-v4": (32, 275), "tpu-v5e": (16, 197), "tpu-v5p": (95, 459), "tpu-v6e": (32, 918),
    "a100-80gb": (80, 312), "h100": (80, 989), "h200": (141, 989), "ascend-910b": (64, 313),
}

_CONFIG = cli.define_config_flag()
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices; default: search for the "
                                "smallest power-of-two mesh that fits.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh axis sizes, e.g. data:1,fsdp:8,seq:8,tensor:1 "
                            "(missing axes are 1; one may be -1 with --devices).")
_HBM = flags.DEFINE_float("hbm_gb", None,
                          "Memory per device in GiB (default: --device's, else 95).")
_DEVICE = flags.DEFINE_enum("device", None, list(DEVICES), "Accelerator preset: sets "
                            "--hbm_gb and the peak FLOP/s used for the step-time estimate.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
_MAX_DEVICES = flags.DEFINE_integer("max_devices", 16384, "Largest mesh the search tries.")
_SLICES = flags.DEFINE_list("slices", [], "One line per slice instead of a table, e.g. "
                            "tpu-v5p:64,h100:8 (preset:device count).")
_CHECK = flags.DEFINE_bool("check", False, "Compile the train step (with --serve: the prefill "
                           "step) on the local devices and compare with XLA's memory analysis "
                           "(tiny/small configs).")
_SERVE = flags.DEFINE_bool("serve", False, "Plan serving a prompt with vita_jax.generate instead "
                           "of a training step; --mesh then takes seq, fsdp and tensor.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", None, "(--serve) prompt tokens; default: the "
                                   "longest the model accepts (max_position_embeddings - "
                                   "max_new_tokens).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "(--serve) tokens to generate at most.")
_BATCH = flags.DEFINE_integer("batch", 1, "(--serve) prompts prefilled together (rows of "
                              "input_ids).")
_WEIGHTS_DTYPE = flags.DEFINE_enum(
    "weights_dtype", None, list(memory_model.BYTES), "(--serve) dtype the served weights are "
    "held in; default: the compute dtype, as load_pretrained(dir, dtype=...) and generate "
    "--dtype load a Hugging Face directory. A training workdir loads its param_dtype (float32).")


def parse_mesh(text: str) -> dict[str, int]:
  shape = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    axis, sep, size = part.partition(":")
    if not sep or axis not in MESH_AXES:
      raise ConfigError(f"--mesh entry {part!r} is not AXIS:SIZE with AXIS one of "
                        f"{', '.join(MESH_AXES)}; e.g. --mesh=data:1,fsdp:8,seq:8,tensor:1")
    try:
      shape[axis] = int(size)
    except ValueError:
      raise ConfigError(f"--mesh size {size!r} for {axis} is not an integer") from None
  return shape


def with_mesh(config: ml_collections.ConfigDict, shape: dict[str, int]):
  config = copy.deepcopy(config)
  for axis in MESH_AXES:
    config.mesh[axis] = int(shape.get(axis, 1))
  return config


def is_valid(config, shape: dict[str, int]) -> bool:
  try:
    validation.validate(with_mesh(config, shape), math.prod(shape.values()))
  except ConfigError:
    return False
  return True


def meshes(num_devices: int, max_tensor: int) -> Iterator[dict[str, int]]:
  """Every (data, fsdp, seq, tensor) with product num_devices and tensor <= max_tensor."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  for tensor, seq, fsdp in itertools.product(divisors, repeat=3):
    rest = num_devices // (tensor * seq * fsdp) if num_devices % (tensor * seq * fsdp) == 0 else 0
    if rest and tensor <= max_tensor:
      yield dict(data=rest, fsdp=fsdp, seq=seq, tensor=tensor)


def best_mesh(config, num_devices: int, hbm_bytes: float):
  """(shape, estimate, fits) at num_devices: among valid meshes that fit, the one with the
  least tensor, then sequence, parallelism (the costliest links), then the most data
  parallelism; when none fits, the one with the lowest peak. None if no mesh is valid."""
  best = None
  for shape in meshes(num_devices, config.model.llm.num_heads):
    if not is_valid(config, shape):
      continue
    est = memory_model.estimate(config, shape)
    fits = est.peak <= hbm_bytes
    key = (not fits, shape["tensor"], shape["seq"], -shape["data"], est.peak) if fits else \
        (True, est.peak)
    if best is None or key < best[0]:
      best = (key, shape, est, fits)
  return None if best is None else best[1:]


def smallest_fitting_mesh(config, hbm_bytes: float, start: int, limit: int):
  n = 1
  while n < start:
    n *= 2
  while n <= limit:
    found = best_mesh(config, n, hbm_bytes)
    if found and found[2]:
      return found
    n *= 2
  return None


def step_flops(config) -> float:
  from vita_jax.training import flops
  data = config.data
  return flops.train_flops_per_step(
      config.model, batch=data.global_batch_size, seq_len=data.seq_len,
      tiles=memory_model.tile_budget(config) * max(int(config.train.grad_accum), 1),
      trainable=tuple(config.train.trainable))


def describe(shape: dict[str, int]) -> str:
  return " ".join(f"{a}={shape[a]}" for a in MESH_AXES) + f" ({math.prod(shape.values())} devices)"


def format_table(config, shape, est: memory_model.Estimate, hbm_bytes: float,
                 peak_tflops: float | None, mfu: float) -> str:
  """The human-readable plan of one mesh."""
  m, d, t = config.model, config.data, config.train
  tok = memory_model.tokens_per_device(config, shape)
  lines = [
      f"Long-VITA {m.size} · stage {config.stage} · seq_len {d.seq_len:,} × global batch "
      f"{d.global_batch_size} (grad_accum {t.grad_accum}) · trainable {'+'.join(t.trainable)} · "
      f"remat {m.remat} · {m.compute_dtype} compute",
      f"mesh {describe(shape)} · {tok:,} tokens/device · attention "
      f"{memory_model.attention_kernel(shape, str(m.attention.get('impl', 'jnp')))} · "
      f"{memory_model.tile_budget(config)} tiles/micro-batch",
      "",
      f"  {'per-device memory':<44}{'GiB':>9}",
  ]

  def rows(title, items):
    items = [(k, v) for k, v in items.items() if v]
    if items:
      if title:
        lines.append(f"  {title}")
      lines.extend(f"  {'  ' if title else ''}{k:<{44 - (2 if title else 0)}}{v / GIB:>9.3f}"
                   for k, v in items)

  rows("", est.kept)
  rows("vision phase (short-lived):", est.vision_phase)
  rows("decoder phase:", est.llm_phase)
  verdict = "fits" if est.peak <= hbm_bytes else "does NOT fit"
  lines.append(f"  {'peak':<44}{est.peak / GIB:>9.3f}   of {hbm_bytes / GIB:.1f} GiB: {verdict} "
               f"({est.peak / hbm_bytes:.0%})")
  total, n = step_flops(config), math.prod(shape.values())
  flop_line = f"  step FLOPs {total:.3e} ({total / n:.3e} per device)"
  if peak_tflops:
    flop_line += (f"; ≈ {total / n / (peak_tflops * 1e12 * mfu):.2f} s/step at {mfu:.0%} MFU "
                  f"of {peak_tflops:g} TFLOP/s")
  lines.append(flop_line)
  return "\n".join(lines)


def plan(config, *, devices: int | None, mesh_text: str, hbm_gb: float,
         peak_tflops: float | None = None, mfu: float = 0.4, max_devices: int = 16384) -> str:
  """The text `python -m vita_jax.plan` prints (without --check)."""
  hbm = hbm_gb * GIB
  out = []
  if mesh_text:
    shape = resolve_mesh_shape(parse_mesh(mesh_text), devices or math.prod(
        s for s in parse_mesh(mesh_text).values() if s > 0))
    validation.validate(with_mesh(config, shape), math.prod(shape.values()))
    est, fits = memory_model.estimate(config, shape), None
    fits = est.peak <= hbm
  elif devices:
    found = best_mesh(config, devices, hbm)
    if found is None:
      raise ConfigError(f"no mesh of {devices} devices is valid for this config (sequence "
                        f"length {config.data.seq_len}, micro-batch of "
                        f"{config.data.global_batch_size // config.train.grad_accum}); try "
                        "another --devices")
    shape, est, fits = found
  else:
    found = smallest_fitting_mesh(config, hbm, 1, max_devices)
    if found is None:
      return f"no mesh of up to {max_devices} devices fits in {hbm_gb:g} GiB per device"
    shape, est, fits = found
  out.append(format_table(config, shape, est, hbm, peak_tflops, mfu))
  if not fits:
    n = math.prod(shape.values())
    bigger = smallest_fitting_mesh(config, hbm, 2 * n, max_devices)
    if bigger is None:
      out.append(f"\nno mesh of up to {max_devices} devices fits in {hbm_gb:g} GiB per device")
    else:
      out.append("\nsmallest mesh that fits:\n" +
                 format_table(config, bigger[0], bigger[1], hbm, peak_tflops, mfu))
  return "\n".join(out)


def compiled_memory(config, shape: dict[str, int]) -> dict[str, int]:
  """XLA's per-device memory analysis of the jitted train step on the local devices, built the
  way vita_jax.train builds it (abstract state: nothing is allocated)."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding

  from vita_jax.models.vlm import LongVITA
  from vita_jax.parallel.mesh import make_mesh
  from vita_jax.parallel.sharding import logical_to_spec
  from vita_jax.training import optim
  from vita_jax.training import state as train_state
  from vita_jax.training import step as train_step

  n = math.prod(shape.values())
  if n > jax.device_count():
    raise ConfigError(f"--check needs {n} devices but this machine has {jax.device_count()}; "
                      "choose a smaller --mesh (tests use 8 fake CPU devices)")
  mesh = make_mesh(shape, jax.devices()[:n])
  model = nnx.eval_shape(lambda: LongVITA(config.model, rngs=nnx.Rngs(0), mesh=mesh))
  split, params, frozen = train_state.split_model(model, tuple(config.train.trainable))
  tx, schedule = optim.make_optimizer(params, split.trainable_axes, config.train)

  state_sh, frozen_sh = train_state.state_shardings(tx, split, params, frozen, mesh)
  shapes = jax.eval_shape(functools.partial(train_state.initial_state, tx), params)
  state = train_state.abstract_like(shapes, state_sh)
  frozen = train_state.abstract_like(frozen, frozen_sh)

  accum = max(int(config.train.grad_accum), 1)
  rows, seq = config.data.global_batch_size // accum, config.data.seq_len
  tokens = NamedSharding(mesh, logical_to_spec((None, "batch", "length"), mesh))
  side = config.model.vision.image_size
  batch = {k: jax.ShapeDtypeStruct((accum, rows, seq), jax.numpy.int32, sharding=tokens)
           for k in ("input_ids", "labels", "positions", "segment_ids", "context_index")}
  pixel_shape = (accum, memory_model.tile_budget(config), side, side, 3)
  pixels = NamedSharding(mesh, logical_to_spec((None, "batch", None, None, None), mesh,
                                               pixel_shape))   # as train.py feeds them
  batch["pixel_values"] = jax.ShapeDtypeStruct(pixel_shape, jax.numpy.float32, sharding=pixels)
  step = jax.jit(train_step.make_train_step(split, tx, schedule, config), donate_argnums=(0,),
                 out_shardings=(state_sh, None))
  analysis = step.lower(state, frozen, batch).compile().memory_analysis()
  out = {k: int(getattr(analysis, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def check_report(config, mesh_text: str) -> str:
  """Predicted vs XLA per-device bytes for the given (small) config and mesh."""
  import jax
  shape = resolve_mesh_shape(parse_mesh(mesh_text or "data:-1"), jax.device_count()) \
      if "-1" in (mesh_text or "-1") else resolve_mesh_shape(
          parse_mesh(mesh_text), math.prod(parse_mesh(mesh_text).values()))
  validation.validate(with_mesh(config, shape), math.prod(shape.values()))
  est = memory_model.estimate(config, shape)
  xla = compiled_memory(with_mesh(config, shape), shape)
  mib = 1024 ** 2
  lines = [f"plan --check: {config.model.size} stage {config.stage}, mesh {describe(shape)}",
           f"  {'per device (MiB)':<22}{'planner':>10}{'XLA':>10}{'ratio':>8}"]
  for name, pred, real in (("arguments", est.arguments, xla["argument"]),
                           ("temporaries", est.temp, xla["temp"]),
                           ("peak", est.peak, xla["peak"])):
    lines.append(f"  {name:<22}{pred / mib:>10.2f}{real / mib:>10.2f}{pred / max(real, 1):>8.2f}")
  return "\n".join(lines)


def slice_summary(config, slices: list[str], mfu: float = 0.4) -> str:
  """One markdown row per `preset:count`: the best mesh, its peak and the step time."""
  lines = ["| slice | mesh (data, fsdp, seq, tensor) | peak GiB / HBM | step time @ "
           f"{mfu:.0%} MFU |", "|---|---|---|---|"]
  for item in slices:
    name, _, count = item.partition(":")
    if name not in DEVICES or not count.isdigit():
      raise ConfigError(f"--slices entry {item!r} is not PRESET:COUNT with PRESET one of "
                        f"{', '.join(DEVICES)}")
    hbm_gb, tflops = DEVICES[name]
    found = best_mesh(config, int(count), hbm_gb * GIB)
    if found is None:
      lines.append(f"| {name} x{count} | no valid mesh | | |")
      continue
    shape, est, fits = found
    mesh = ", ".join(str(shape[a]) for a in MESH_AXES)
    seconds = step_flops(config) / int(count) / (tflops * 1e12 * mfu)
    verdict = f"{est.peak / GIB:.1f} / {hbm_gb}" + ("" if fits else " (does not fit)")
    lines.append(f"| {name} x{count} | {mesh} | {verdict} | "
                 f"{f'{seconds:.1f} s' if fits else '-'} |")
  return "\n".join(lines)


# Serving (--serve): vita_jax.generate's generation mesh is data=1 x fsdp x seq x tensor.


@dataclasses.dataclass(frozen=True)
class Serving:
  """What is served: `batch` prompts of `prompt_len` tokens, up to `max_new_tokens` new ones
  each, with the weights in `weights_dtype` (None: the compute dtype)."""
  prompt_len: int
  max_new_tokens: int = 64
  batch: int = 1
  weights_dtype: str | None = None

  def estimate(self, config, shape: dict[str, int]) -> memory_model.ServeEstimate:
    return memory_model.serve_estimate(config.model, self.prompt_len, shape,
                                       max_new_tokens=self.max_new_tokens, batch=self.batch,
                                       weights_dtype=self.weights_dtype)


def serving(config, prompt_len: int | None = None, max_new_tokens: int = 64, batch: int = 1,
            weights_dtype: str | None = None) -> Serving:
  """A Serving checked as vita_jax.generate checks its arguments (the prompt and the new
  tokens must fit in the model's max_position_embeddings)."""
  limit = config.model.llm.get("max_position_embeddings", None)
  if max_new_tokens < 1 or batch < 1:
    raise ConfigError(f"--max_new_tokens={max_new_tokens} and --batch={batch} must be at least 1")
  if prompt_len is None:
    if not limit:
      raise ConfigError("this model has no max_position_embeddings; pass --prompt_len")
    prompt_len = int(limit) - max_new_tokens
  if prompt_len < 1:
    raise ConfigError(f"--prompt_len={prompt_len} must be at least 1")
  if limit and prompt_len + max_new_tokens > int(limit):
    raise ConfigError(
        f"a {prompt_len:,}-token prompt and max_new_tokens={max_new_tokens} are "
        f"{prompt_len + max_new_tokens:,} tokens, more than the model's maximum length "
        f"{int(limit):,} (config.model.llm.max_position_embeddings), which vita_jax.generate "
        f"refuses; use --prompt_len={int(limit) - max_new_tokens} or fewer")
  return Serving(int(prompt_len), int(max_new_tokens), int(batch), weights_dtype)


def serve_mesh(mesh_text: str, devices: int | None) -> dict[str, int]:
  """The generation mesh of --mesh (seq, fsdp, tensor; data must be 1)."""
  asked = parse_mesh(mesh_text)
  if asked.get("data", 1) != 1:
    raise ConfigError(f"--serve: the generation mesh has data=1 (vita_jax.generate shards the "
                      f"prompt over seq and the weights over fsdp and tensor); got "
                      f"data={asked['data']}, e.g. --mesh=seq:8,tensor:4")
  return resolve_mesh_shape(asked, devices or math.prod(s for s in asked.values() if s > 0))


def serve_meshes(num_devices: int, max_tensor: int) -> Iterator[dict[str, int]]:
  """Every generation mesh (fsdp, seq, tensor) of num_devices with tensor <= max_tensor."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  for tensor, fsdp in itertools.product(divisors, repeat=2):
    if num_devices % (tensor * fsdp) == 0 and tensor <= max_tensor:
      yield dict(data=1, fsdp=fsdp, seq=num_devices // (tensor * fsdp), tensor=tensor)


def best_serve_mesh(config, serve: Serving, num_devices: int, hbm_bytes: float):
  """(shape, estimate, fits) at num_devices: among the meshes that fit, the one with the least
  tensor, then fsdp, parallelism (so the most seq: the prompt, its compute and its KV cache
  split over the ring); when none fits, the one with the lowest total."""
  best = None
  for shape in serve_meshes(num_devices, config.model.llm.num_heads):
    est = serve.estimate(config, shape)
    fits = est.total <= hbm_bytes
    key = (False, shape["tensor"], shape["fsdp"], est.total) if fits else (True, est.total)
    if best is None or key < best[0]:
      best = (key, shape, est, fits)
  return None if best is None else best[1:]


def smallest_serve_mesh(config, serve: Serving, hbm_bytes: float, start: int, limit: int):
  n = 1
  while n < start:
    n *= 2
  while n <= limit:
    found = best_serve_mesh(config, serve, n, hbm_bytes)
    if found and found[2]:
      return found
    n *= 2
  return None


def describe_serve(shape: dict[str, int]) -> str:
  return " ".join(f"{a}={shape[a]}" for a in ("seq", "fsdp", "tensor")) + \
      f" ({shape['seq'] * shape['fsdp'] * shape['tensor']} devices)"


def format_serve_table(config, serve: Serving, shape, est: memory_model.ServeEstimate,
                       hbm_bytes: float) -> str:
  """The human-readable serving plan of one generation mesh."""
  m = config.model
  kernel = memory_model.attention_kernel(shape, str(m.attention.get("impl", "jnp")))
  attention = {"ring": f"ring attention over seq={shape['seq']}",
               "chunked": "chunked attention (no seq sharding)",
               "dense": "dense attention (no seq sharding)"}[kernel]
  lines = [
      f"Long-VITA {m.size} · serving {serve.batch} × {serve.prompt_len:,}-token prompt "
      f"(bucket {est.bucket:,}) + up to {serve.max_new_tokens:,} new tokens · weights "
      f"{serve.weights_dtype or m.compute_dtype} · {m.compute_dtype} compute · text only",
      f"generation mesh {describe_serve(shape)} · {est.tokens:,} prompt tokens/device · "
      f"{attention}",
      "",
      f"  {'per-device memory':<50}{'GiB':>9}",
  ]

  def section(title, items):
    lines.append(f"  {title:<50}{sum(items.values()) / GIB:>9.3f}")
    lines.extend(f"    {k:<48}{v / GIB:>9.3f}" for k, v in items.items() if v)

  section("weights", est.weights)
  section("KV cache", est.kv_cache)
  section("prefill activations (one layer at a time)", est.activations)
  small = est.inputs + est.logits
  lines.append(f"  {'prompt arrays + last-token logits':<50}{small / GIB:>9.3f}")
  verdict = "fits" if est.total <= hbm_bytes else "does NOT fit"
  lines.append(f"  {'total (prefill peak)':<50}{est.total / GIB:>9.3f}   of "
               f"{hbm_bytes / GIB:.1f} GiB: {verdict} ({est.total / hbm_bytes:.0%})")
  lines.append(f"  then decode holds the weights and KV cache ({est.decode / GIB:.3f} GiB) and one "
               "token's temporaries")
  return "\n".join(lines)


def serve_plan(config, serve: Serving, *, devices: int | None, mesh_text: str, hbm_gb: float,
               max_devices: int = 16384) -> str:
  """The text `python -m vita_jax.plan --serve` prints (without --check)."""
  hbm = hbm_gb * GIB
  if mesh_text:
    shape = serve_mesh(mesh_text, devices)
    est = serve.estimate(config, shape)
    fits = est.total <= hbm
  elif devices:
    shape, est, fits = best_serve_mesh(config, serve, devices, hbm)
  else:
    found = smallest_serve_mesh(config, serve, hbm, 1, max_devices)
    if found is None:
      return f"no generation mesh of up to {max_devices} devices fits in {hbm_gb:g} GiB per device"
    shape, est, fits = found
  out = [format_serve_table(config, serve, shape, est, hbm)]
  if not fits:
    n = shape["seq"] * shape["fsdp"] * shape["tensor"]
    bigger = smallest_serve_mesh(config, serve, hbm, 2 * n, max_devices)
    if bigger is None:
      out.append(f"\nno generation mesh of up to {max_devices} devices fits in {hbm_gb:g} GiB "
                 "per device")
    else:
      out.append("\nsmallest generation mesh that fits:\n" +
                 format_serve_table(config, serve, bigger[0], bigger[1], hbm))
  return "\n".join(out)


def serve_slice_summary(config, serve: Serving, slices: list[str]) -> str:
  """One markdown row per `preset:count`: the generation mesh over all its devices, the
  per-device memory, and the smallest mesh that would do."""
  lines = ["| slice | generation mesh (seq, fsdp, tensor) | weights | KV cache | activations | "
           "total GiB / HBM | smallest mesh that fits |", "|---|---|---|---|---|---|---|"]
  for item in slices:
    name, _, count = item.partition(":")
    if name not in DEVICES or not count.isdigit():
      raise ConfigError(f"--slices entry {item!r} is not PRESET:COUNT with PRESET one of "
                        f"{', '.join(DEVICES)}")
    hbm = DEVICES[name][0] * GIB
    shape, est, fits = best_serve_mesh(config, serve, int(count), hbm)
    least = smallest_serve_mesh(config, serve, hbm, 1, int(count))
    g = lambda x: f"{x / GIB:.1f}"
    lines.append(
        f"| {name} x{count} | {shape['seq']}, {shape['fsdp']}, {shape['tensor']} | "
        f"{g(sum(est.weights.values()))} | {g(sum(est.kv_cache.values()))} | "
        f"{g(sum(est.activations.values()))} | {g(est.total)} / {DEVICES[name][0]}"
        f"{'' if fits else ' (does not fit)'} | "
        f"{describe_serve(least[0]) if least else 'none'} |")
  return "\n".join(lines)


def compiled_serve_memory(config, serve: Serving, shape: dict[str, int]) -> dict[str, int]:
  """XLA's per-device memory analysis of `decoding.prefill_step` jitted as vita_jax.generate
  jits it, on the local devices, with abstract inputs (nothing is allocated): the weights in
  `serve.weights_dtype` placed by `shard_state`'s logical-axis shardings, the bucketed prompt
  sharded over seq."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from vita_jax.models import decoding
  from vita_jax.models.vlm import LongVITA
  from vita_jax.parallel.mesh import make_mesh
  from vita_jax.parallel.sharding import logical_to_spec, state_shardings

  sizes = {"data": 1, "fsdp": shape["fsdp"], "seq": shape["seq"], "tensor": shape["tensor"]}
  n = math.prod(sizes.values())
  if n > jax.device_count():
    raise ConfigError(f"--check needs {n} devices but this machine has {jax.device_count()}; "
                      "choose a smaller --mesh (tests use 8 fake CPU devices)")
  mesh = make_mesh(sizes, jax.devices()[:n])
  model_cfg = copy.deepcopy(config.model)
  model_cfg.param_dtype = serve.weights_dtype or model_cfg.compute_dtype
  model = nnx.eval_shape(lambda: LongVITA(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  abstract = jax.tree.map(
      lambda var, sh: var.replace(jax.ShapeDtypeStruct(var.get_value().shape,
                                                       var.get_value().dtype, sharding=sh)),
      state, state_shardings(state, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
  length = memory_model.serve_bucket(serve.prompt_len, sizes["seq"])
  rows = NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh, (serve.batch, length)))
  tokens = jax.ShapeDtypeStruct((serve.batch, length), jax.numpy.int32, sharding=rows)
  last = jax.ShapeDtypeStruct((serve.batch,), jax.numpy.int32, sharding=NamedSharding(mesh, P()))
  step = jax.jit(functools.partial(decoding.prefill_step, graphdef, mesh=mesh),
                 static_argnames=("new_len",))
  analysis = step.lower(abstract, tokens, tokens, None, tokens, tokens, last,
                        new_len=memory_model.new_token_slots(serve.max_new_tokens)
                        ).compile().memory_analysis()
  out = {k: int(getattr(analysis, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def serve_check_report(config, serve: Serving, mesh_text: str) -> str:
  """Predicted vs XLA per-device bytes of the prefill step for a (small) config and mesh."""
  import jax
  shape = serve_mesh(mesh_text, None) if mesh_text else dict(
      data=1, fsdp=1, seq=jax.device_count(), tensor=1)
  est = serve.estimate(config, shape)
  xla = compiled_serve_memory(config, serve, shape)
  mib = 1024 ** 2
  lines = [f"plan --serve --check: {config.model.size}, {serve.batch} × {serve.prompt_len:,}-token "
           f"prompt (bucket {est.bucket:,}), generation mesh {describe_serve(shape)}",
           f"  {'per device (MiB)':<32}{'planner':>10}{'XLA':>10}{'ratio':>8}"]
  for name, pred, real in (("arguments (LLM weights, prompt)", est.prefill_arguments,
                            xla["argument"]),
                           ("outputs (KV cache, logits)", est.prefill_outputs, xla["output"]),
                           ("temporaries (activations)", est.prefill_temp, xla["temp"]),
                           ("peak", est.prefill_peak, xla["peak"])):
    lines.append(f"  {name:<32}{pred / mib:>10.2f}{real / mib:>10.2f}{pred / max(real, 1):>8.2f}")
  lines.append(f"  (not in the compiled step: the vision tower + projector weights, "
               f"{est.weights['vision tower + projector'] / mib:.2f} MiB, unused by prefill)")
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  hbm_gb, peak = _HBM.value, None
  if _DEVICE.value:
    preset_hbm, peak = DEVICES[_DEVICE.value]
    hbm_gb = hbm_gb or preset_hbm
  hbm_gb = hbm_gb or 95.0
  serve = serving(config, _PROMPT_LEN.value, _MAX_NEW.value, _BATCH.value,
                  _WEIGHTS_DTYPE.value) if _SERVE.value else None
  if _CHECK.value:
    # Fake CPU devices for the compile, set before JAX starts its backend.
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 " --xla_force_host_platform_device_count=8").strip()
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(serve_check_report(config, serve, _MESH.value) if serve else
          check_report(config, _MESH.value))
    return
  if serve and _SLICES.value:
    print(serve_slice_summary(config, serve, _SLICES.value))
    return
  if serve:
    print(serve_plan(config, serve, devices=_DEVICES.value, mesh_text=_MESH.value,
                     hbm_gb=hbm_gb, max_devices=_MAX_DEVICES.value))
    return
  if _SLICES.value:
    print(slice_summary(config, _SLICES.value, _MFU.value))
    return
  print(plan(config, devices=_DEVICES.value, mesh_text=_MESH.value, hbm_gb=hbm_gb,
             peak_tflops=peak, mfu=_MFU.value, max_devices=_MAX_DEVICES.value))


if __name__ == "__main__":
  cli.run(main)
