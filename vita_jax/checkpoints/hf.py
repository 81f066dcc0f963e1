"""Hugging Face checkpoint directories (config.json + *.safetensors) <-> LongVITA, both layouts.

    model = load_pretrained("hf_dir", dtype="float32")         # layout from config.json
    save_pretrained(model, "out_dir", layout="internvl", dtype="bfloat16")

Loading streams tensor by tensor (safetensors, memory-mapped) into an abstract model, so a
14B checkpoint never needs two host copies; with `mesh` each parameter goes straight to its
sharding. Saving writes shards of at most `max_shard_bytes` plus `model.safetensors.index.json`.

The framework-free pieces both frameworks use live in vita_jax.spec: config.json <-> model
config (`hf_config`), the key tables (`hf_mapping`) and the file readers `read_hf_config` and
`SafetensorsDir` (`hf_files`, re-exported here for the commands).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from vita_jax.data.tokenizer import checkpoint_model_config
from vita_jax.spec.hf_config import detect_layout, hf_config_from_model_config
from vita_jax.spec.hf_files import INDEX, SafetensorsDir, read_hf_config
from vita_jax.spec.hf_mapping import (
  LAYOUTS,
  disk_key,
  ignorable_keys,
  params_from_hf,
  params_to_hf,
)

__all__ = ["load_pretrained", "save_pretrained", "read_hf_config", "SafetensorsDir",
           "detect_layout", "check_checkpoint", "abstract_model", "LAYOUTS"]

_MAX_LISTED = 20


def abstract_model(cfg, mesh=None):
  """The model's graph and abstract (shape-only) state, without allocating parameters."""
  from vita_jax.models.vlm import LongVITA
  return nnx.split(nnx.eval_shape(lambda: LongVITA(cfg, rngs=nnx.Rngs(0), mesh=mesh)))


def expected_hf_shapes(cfg, layout: str, shapes: Mapping) -> dict[str, tuple[int, ...]]:
  """{hf_key: shape} a checkpoint of `cfg` in `layout` must hold (no memory touched)."""
  empty = {p: np.empty(s, np.float32) for p, s in shapes.items()}   # lazily allocated
  return {k: tuple(v.shape) for k, v in params_to_hf(empty, cfg, layout)}


def check_checkpoint(tensors: SafetensorsDir, cfg, layout: str, shapes: Mapping):
  """Raise one ValueError listing every missing, unexpected or mis-shaped tensor."""
  want = expected_hf_shapes(cfg, layout, shapes)
  have = set(tensors)
  missing = sorted(set(want) - have)
  unexpected = sorted(have - set(want) - ignorable_keys(cfg))
  wrong = [f"{k}: checkpoint {tensors.shape(k)} vs config {want[k]}"
           for k in sorted(set(want) & have) if tensors.shape(k) != want[k]]
  problems = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
    if items:
      more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
      problems.append(f"{title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more)
  if problems:
    raise ValueError(f"the {layout} checkpoint does not match its config.json:\n  " +
                     "\n  ".join(problems))


def _state_shapes(state) -> dict:
  return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def load_pretrained(path: str, dtype="float32", *, compute_dtype=None, mesh=None,
                    config_overrides: Mapping | None = None, tokenizer: str = ""):
  """A LongVITA model with the weights of HF directory `path` (either layout).

  dtype: parameter dtype; compute_dtype defaults to it. `model.config` is the model ConfigDict
  derived from config.json (with `layout` set). `config_overrides` (e.g. {"remat": "full"})
  are applied to that ConfigDict before the model is built. The special-token ids come from
  config.json, else from `tokenizer` or the tokenizer files in `path` (checkpoint_model_config).
  """
  cfg = checkpoint_model_config(path, tokenizer)
  cfg.param_dtype = jnp.dtype(dtype).name
  cfg.compute_dtype = jnp.dtype(compute_dtype or dtype).name
  cfg.remat = "none"
  for k, v in (config_overrides or {}).items():
    cfg[k] = v
  graphdef, state = abstract_model(cfg, mesh)
  flat = dict(nnx.to_flat_state(state))
  tensors = SafetensorsDir(path, cfg.layout)
  check_checkpoint(tensors, cfg, cfg.layout, _state_shapes(state))
  np_dtype = jnp.dtype(cfg.param_dtype)
  filled = []
  for p, arr in params_from_hf(tensors, cfg, cfg.layout, _state_shapes(state), np_dtype):
    var = flat.pop(p)
    if mesh is not None:
      from vita_jax.parallel.sharding import named_sharding
      names = var.get_metadata().get("logical_axes") or (None,) * arr.ndim
      value = jax.device_put(arr, named_sharding(mesh, names, arr.shape))
    else:
      value = jnp.asarray(arr)
    filled.append((p, var.replace(value)))
    del arr
  if flat:
    raise ValueError(f"no checkpoint rule fills {sorted(flat)}: the key table is incomplete")
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _shard_plan(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
  shards, current, used = [], [], 0
  for key, nbytes in sizes:
    if current and used + nbytes > max_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(key)
    used += nbytes
  return shards + [current] if current else shards


def save_pretrained(model, path: str, layout: str | None = None, *, dtype=None,
                    max_shard_bytes: int = 4 << 30):
  """Write `model` as an HF directory in `layout` (default: the model's own layout).

  dtype: tensor dtype on disk (default: the parameter dtype). Tensors are produced one
  parameter at a time and written shard by shard.
  """
  cfg = model.config
  layout = layout or cfg.get("layout", "long_vita")
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
  state = nnx.state(model, nnx.Param)
  flat = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
  out_dtype = jnp.dtype(dtype or cfg.param_dtype)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config_from_model_config(cfg, layout, out_dtype.name), f, indent=2)

  shapes = expected_hf_shapes(cfg, layout, {p: v.shape for p, v in flat.items()})
  sizes = [(k, int(np.prod(s)) * out_dtype.itemsize) for k, s in shapes.items()]
  plan = _shard_plan(sizes, max_shard_bytes)
  names = (["model.safetensors"] if len(plan) == 1 else
           [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
  shard_of = {k: i for i, keys in enumerate(plan) for k in keys}
  on_disk = lambda k: disk_key(k, layout)
  host = _HostParams(flat)
  pending: dict[str, np.ndarray] = {}
  for key, arr in params_to_hf(host, cfg, layout):
    pending[on_disk(key)] = np.ascontiguousarray(arr.astype(out_dtype))
    i = shard_of[key]
    if len(pending) == len(plan[i]):            # shard i is complete: write and free it
      save_file(pending, os.path.join(path, names[i]), metadata={"format": "pt"})
      os.chmod(os.path.join(path, names[i]), 0o644)   # safetensors writes 0600
      pending = {}
  if len(plan) > 1:
    index = {"metadata": {"total_size": sum(n for _, n in sizes)},
             "weight_map": {on_disk(k): names[i] for k, i in shard_of.items()}}
    with open(os.path.join(path, INDEX), "w") as f:
      json.dump(index, f, indent=2)
  return path


class _HostParams(Mapping):
  """Device arrays fetched to host one parameter at a time (the last one is cached)."""

  def __init__(self, flat):
    self._flat, self._last = flat, (None, None)

  def __getitem__(self, p):
    if self._last[0] != p:
      self._last = (p, np.asarray(jax.device_get(self._flat[p])))
    return self._last[1]

  def __iter__(self):
    return iter(self._flat)

  def __len__(self):
    return len(self._flat)
