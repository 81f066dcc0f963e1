"""A training workdir as a model source: its config.json and its newest checkpoint's weights.

    model, config = load_model_from_workdir("runs/demo")

Also the weight loading used by stage chaining (`config.init_from*`): a workdir's checkpoint is
restored straight onto the loading model's shardings (`restore_workdir_params`); weights from a
Hugging Face directory, given flat {path: array}, are copied in (`assign_params`). Whatever
differs (missing, unexpected, wrong shape) is reported by name.
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


def _model_params(model: nnx.Module) -> dict[tuple, nnx.Variable]:
  """{path: Variable} of the model's parameters (trainable and frozen alike)."""
  state = nnx.state(model, nnx.Param)
  current = {}
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(
      x, nnx.Variable)):
    current[_key_path(path)] = var
  return current


def _key_path(path) -> tuple:
  return tuple(_norm_key(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_fit(shapes: dict[tuple, tuple], current: dict[tuple, nnx.Variable], *, source: str,
              prefix: tuple = (), require_all: bool = False) -> None:
  """Raise one ValueError listing every path of `shapes` ({path: shape} of the weights) that
  the model lacks or has in another shape, and (when `require_all`) every model parameter
  under `prefix` that the weights lack; only report the latter otherwise."""
  unexpected = sorted(".".join(map(str, p)) for p in shapes if p not in current)
  mismatched = [f"{'.'.join(map(str, p))}: checkpoint {tuple(shape)} vs model "
                f"{tuple(current[p].get_value().shape)}"
                for p, shape in shapes.items()
                if p in current and tuple(shape) != tuple(current[p].get_value().shape)]
  missing = sorted(".".join(map(str, p)) for p in current
                   if p[:len(prefix)] == prefix and p not in shapes)
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


def assign_params(model: nnx.Module, weights: dict[tuple, np.ndarray], *, source: str,
                  prefix: tuple = (), require_all: bool = False) -> list[tuple]:
  """Copy `weights` (flat {path: host array}) into `model` in place; returns the paths set.

  Unexpected paths and shape mismatches are errors that list every offender; params under
  `prefix` that `weights` lacks are an error when `require_all`, else only reported.
  """
  current = _model_params(model)
  check_fit({p: np.shape(w) for p, w in weights.items()}, current, source=source, prefix=prefix,
            require_all=require_all)
  for path, value in weights.items():
    var = current[path]
    old = var.get_value()
    # Keep the parameter's placement: a sharded model stays sharded while it is filled.
    var.set_value(jax.device_put(np.asarray(value, old.dtype), old.sharding))
  return list(weights)


def restore_workdir_params(model: nnx.Module, workdir: str) -> list[tuple]:
  """Fill every parameter of `model` from a workdir's newest loadable checkpoint, in place.

  Each array is restored straight onto the sharding the model's parameter has (the mesh of the
  run that loads it, any size, any number of processes): every process reads only the pieces
  its own devices hold, nothing is gathered to one host, and the optimizer state is never
  read. The model must have exactly the checkpoint's parameters (trainable and frozen alike;
  one error names every difference). A damaged newest checkpoint is reported and the one
  before it used. Returns the paths set.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} not found: {workdir!r} is not a training workdir "
                            "written by vita_jax.train")
  current = _model_params(model)
  roots = (("state", "params"), ("frozen",))

  def ours(path) -> tuple:          # a saved leaf's key path -> the model's parameter path
    keys = _key_path(path)
    return keys[2:] if keys[:2] == roots[0] else keys[1:]

  def target(saved):
    shapes = {ours(p): m.shape for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    check_fit(shapes, current, source=workdir, require_all=True)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: (current[ours(p)].get_value().sharding, current[ours(p)].get_value().dtype),
        saved)

  ckpt = Checkpointer(directory)
  try:
    found = ckpt.restore_sharded(roots, target)
  except RestoreError as e:
    raise InputError(str(e)) from e
  finally:
    ckpt.close()
  if found is None:
    raise FileNotFoundError(f"no complete checkpoint under {directory}: the run stopped before "
                            "its first save; resume it (the same train command) or pick another "
                            "workdir")
  for path, value in jax.tree_util.tree_leaves_with_path(found[1]):
    current[ours(path)].set_value(value)
  return [ours(p) for p, _ in jax.tree_util.tree_leaves_with_path(found[1])]


def load_model_from_workdir(workdir: str, *, dtype: str | None = None, mesh=None):
  """(model, config) rebuilt from a workdir's config.json and newest checkpoint."""
  from vita_jax.models.vlm import LongVITA
  config = load_config(workdir)
  if dtype is not None:
    config.model.compute_dtype = dtype
  model = LongVITA(config.model, rngs=nnx.Rngs(0), mesh=mesh)
  restore_workdir_params(model, workdir)
  return model, config
