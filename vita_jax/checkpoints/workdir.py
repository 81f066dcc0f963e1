"""A training workdir as a model source: its config.json and its newest checkpoint's weights.

    model, config = load_model_from_workdir("runs/demo")

Also the partial weight loading used by stage chaining (`config.init_from*`): weights given as
a nested dict keyed like the model's state are copied in, and whatever differs (missing,
unexpected, wrong shape) is reported by name.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from vita_jax.checkpoints.run import Checkpointer, RestoreError
from vita_jax.errors import InputError

CONFIG_FILE = "config.json"


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a training workdir written "
                            "by vita_jax.train")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
  """Nested dicts -> {key path tuple: leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _norm_key(k):
  return int(k) if isinstance(k, str) and k.isdigit() else k


def read_workdir_params(workdir: str) -> dict[tuple, np.ndarray]:
  """Flat {path: host array} of all parameters (trainable and frozen) of a workdir's newest
  loadable checkpoint; a damaged newest one is reported and the one before it used."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} not found: {workdir!r} is not a training workdir "
                            "written by vita_jax.train")
  ckpt = Checkpointer(directory)
  try:
    found = ckpt.restore_on_host(("state", "params"), ("frozen",))
  except RestoreError as e:
    raise InputError(str(e)) from e
  finally:
    ckpt.close()
  if found is None:
    raise FileNotFoundError(f"no complete checkpoint under {directory}: the run stopped before "
                            "its first save; resume it (the same train command) or pick another "
                            "workdir")
  tree = found[1]
  flat = {}
  for part in (tree["state"]["params"], tree["frozen"]):
    for path, value in flatten(dict(part)).items():
      flat[tuple(_norm_key(k) for k in path)] = np.asarray(value)
  return flat


def assign_params(model: nnx.Module, weights: dict[tuple, np.ndarray], *, source: str,
                  prefix: tuple = (), require_all: bool = False) -> list[tuple]:
  """Copy `weights` (flat {path: array}) into `model` in place; returns the paths set.

  Unexpected paths and shape mismatches are errors that list every offender; params under
  `prefix` that `weights` lacks are an error when `require_all`, else only reported.
  """
  state = nnx.state(model, nnx.Param)
  current = {}
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(
      x, nnx.Variable)):
    key = tuple(_norm_key(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    current[key] = var
  unexpected = sorted(".".join(map(str, p)) for p in weights if p not in current)
  mismatched = [f"{'.'.join(map(str, p))}: checkpoint {tuple(np.shape(w))} vs model "
                f"{tuple(current[p].get_value().shape)}"
                for p, w in weights.items()
                if p in current and tuple(np.shape(w)) != tuple(current[p].get_value().shape)]
  missing = sorted(".".join(map(str, p)) for p in current
                   if p[:len(prefix)] == prefix and p not in weights)
  problems = []
  if mismatched:
    problems.append("shape mismatches: " + "; ".join(mismatched[:20]))
  if unexpected:
    problems.append("unexpected parameters: " + ", ".join(unexpected[:20]))
  if missing and require_all:
    problems.append("missing parameters: " + ", ".join(missing[:20]))
  if problems:
    raise ValueError(f"weights from {source} do not match the model config: "
                     + " | ".join(problems) + ". Check that the config's model size matches "
                     "the checkpoint (e.g. --config=configs/stageN.py:tiny).")
  if missing:
    print(f"note: {len(missing)} parameters not in {source} keep their fresh initialisation "
          f"(e.g. {', '.join(missing[:3])})", flush=True)
  for path, value in weights.items():
    var = current[path]
    old = var.get_value()
    # Keep the parameter's placement: a sharded model stays sharded while it is filled.
    var.set_value(jax.device_put(np.asarray(value, old.dtype), old.sharding))
  return list(weights)


def load_model_from_workdir(workdir: str, *, dtype: str | None = None, mesh=None):
  """(model, config) rebuilt from a workdir's config.json and newest checkpoint."""
  from vita_jax.models.vlm import LongVITA
  config = load_config(workdir)
  if dtype is not None:
    config.model.compute_dtype = dtype
  model = LongVITA(config.model, rngs=nnx.Rngs(0), mesh=mesh)
  assign_params(model, read_workdir_params(workdir), source=workdir, require_all=True)
  return model, config
