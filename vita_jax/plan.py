"""Plan a run before booking the machines: per-device memory, step FLOPs, the mesh that fits.

    python -m vita_jax.plan --config=configs/stage4.py                      # smallest mesh
    python -m vita_jax.plan --config=configs/stage3.py --devices=64 --device=h100
    python -m vita_jax.plan --config=configs/stage2.py:tiny --mesh=fsdp:4,seq:2 --check

Prints the per-device breakdown (master params, gradients, Adam moments, activations under
`model.remat`, attention tiles, LM-head chunk, vision tower) for the given or best mesh, says
whether it fits in `--hbm_gb`, and if not which smallest mesh does. `--check` compiles the real
train step on this machine's (fake) devices and prints XLA's `memory_analysis()` next to the
prediction.
"""

from __future__ import annotations

import copy
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
_CHECK = flags.DEFINE_bool("check", False, "Compile the train step on the local devices and "
                           "compare with XLA's memory analysis (tiny/small configs).")



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
      f"{memory_model.attention_kernel(shape)} · "
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


def main(argv):
  del argv
  config = _CONFIG.value
  hbm_gb, peak = _HBM.value, None
  if _DEVICE.value:
    preset_hbm, peak = DEVICES[_DEVICE.value]
    hbm_gb = hbm_gb or preset_hbm
  hbm_gb = hbm_gb or 95.0
  if _CHECK.value:
    # Fake CPU devices for the compile, set before JAX starts its backend.
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 " --xla_force_host_platform_device_count=8").strip()
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(check_report(config, _MESH.value))
    return
  if _SLICES.value:
    print(slice_summary(config, _SLICES.value, _MFU.value))
    return
  print(plan(config, devices=_DEVICES.value, mesh_text=_MESH.value, hbm_gb=hbm_gb,
             peak_tflops=peak, mfu=_MFU.value, max_devices=_MAX_DEVICES.value))


if __name__ == "__main__":
  cli.run(main)
