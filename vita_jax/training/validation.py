"""Up-front validation of an experiment config, with errors that say what to change.

Everything that would otherwise fail deep inside JAX (a mesh that does not match the devices, a
sequence the ring cannot split, a batch the data axes cannot divide) is checked here first.
"""

from __future__ import annotations

import ml_collections

from vita_jax.data.video import SAMPLING_RULES
from vita_jax.errors import ConfigError
from vita_jax.parallel.mesh import resolve_mesh_shape
from vita_jax.spec.model import DTYPES, REMAT_POLICIES

TRAINABLE = ("vision", "projector", "llm")


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate_model(model: ml_collections.ConfigDict) -> None:
  v, t = model.vision, model.llm
  _check(v.image_size % v.patch_size == 0,
         f"model.vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}")
  side = v.image_size // v.patch_size
  _check(float(side * model.downsample_ratio).is_integer(),
         f"{side}x{side} patches cannot be pixel-shuffled by downsample_ratio="
         f"{model.downsample_ratio}; choose an image_size giving an even patch grid")
  _check(v.hidden_size % v.num_heads == 0,
         f"model.vision.hidden_size={v.hidden_size} is not divisible by num_heads={v.num_heads}")
  _check(t.num_heads % t.num_kv_heads == 0,
         f"model.llm.num_heads={t.num_heads} is not a multiple of num_kv_heads={t.num_kv_heads} "
         "(grouped-query attention needs whole groups)")
  _check(t.head_dim % 2 == 0, f"model.llm.head_dim={t.head_dim} must be even for RoPE")
  for key in ("param_dtype", "compute_dtype"):
    _check(model[key] in DTYPES, f"model.{key}={model[key]!r}; use one of {', '.join(DTYPES)}")
  _check(model.remat in REMAT_POLICIES,
         f"model.remat={model.remat!r}; use one of {', '.join(REMAT_POLICIES)}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Raise ConfigError naming the first bad value; returns the resolved mesh shape."""
  shape = resolve_mesh_shape(config.mesh, num_devices)
  validate_model(config.model)
  data, train = config.data, config.train
  _check(data.seq_len > 0 and data.global_batch_size > 0,
         f"data.seq_len={data.seq_len} and data.global_batch_size={data.global_batch_size} "
         "must be positive")
  seq = shape["seq"]
  if seq > 1:
    unit = 2 * seq
    if data.seq_len % unit:
      fix = (data.seq_len // unit + 1) * unit
      raise ConfigError(
          f"data.seq_len {data.seq_len} is not divisible by 2*seq_shards={unit} (the zigzag "
          f"layout splits it into {unit} chunks); use {fix} or change --config.mesh.seq")
  batch_shards = shape["data"] * shape["fsdp"]
  per_micro = data.global_batch_size // max(train.grad_accum, 1)
  _check(train.grad_accum >= 1 and data.global_batch_size % train.grad_accum == 0,
         f"data.global_batch_size={data.global_batch_size} is not divisible by "
         f"train.grad_accum={train.grad_accum}")
  _check(per_micro % batch_shards == 0,
         f"the micro-batch of {per_micro} sequences (global_batch_size "
         f"{data.global_batch_size} / grad_accum {train.grad_accum}) does not divide over "
         f"data*fsdp={batch_shards} devices; use a multiple of {batch_shards} or change "
         "--config.mesh.data / --config.mesh.fsdp")
  sampling = data.get("video_sampling", "release")
  _check(sampling in SAMPLING_RULES,
         f"data.video_sampling={sampling!r}; use one of {', '.join(SAMPLING_RULES)}")
  bad = [m for m in train.trainable if m not in TRAINABLE]
  _check(not bad, f"train.trainable has {bad[0] if bad else ''!r}; choose from "
         f"{', '.join(TRAINABLE)}")
  _check(len(train.trainable) > 0, "train.trainable is empty; nothing would train")
  _check(train.steps > 0, f"train.steps={train.steps} must be positive")
  _check(0 < train.min_lr <= train.peak_lr,
         f"train.min_lr={train.min_lr} must be positive and at most peak_lr={train.peak_lr}")
  _check(train.log_every > 0 and train.checkpoint_every > 0,
         "train.log_every and train.checkpoint_every must be positive")
  return shape
