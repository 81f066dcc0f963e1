"""Where a stage's starting weights come from (`config.init_from*`), as flat {path: array}.

- `init_from`: a Hugging Face directory of either layout (the whole model).
- `init_from_llm`: a Qwen2 / Qwen2.5 `transformers` directory (its keys are the `long_vita`
  decoder keys: `model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`).
- `init_from_vision`: an InternViT directory in OpenGVLab's layout (the `long_vita` vision keys
  without the `model.vision_model.` prefix).

The weights are read through the checkpoint key table (`vita_jax.spec.hf_mapping`) tensor by
tensor; `vita_jax.checkpoints.workdir.assign_params` then reports every name or shape that differs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vita_jax.checkpoints.hf import abstract_model
from vita_jax.data.tokenizer import checkpoint_model_config
from vita_jax.spec.hf_files import SafetensorsDir
from vita_jax.spec.hf_mapping import params_from_hf, rule_keys, rules

VISION_PREFIX = "model.vision_model."


class _Prefixed(Mapping):
  """A view of `tensors` under extra key `prefix` (OpenGVLab InternViT dir -> long_vita keys)."""

  def __init__(self, tensors, prefix: str):
    self.tensors, self.prefix = tensors, prefix

  def __getitem__(self, key):
    if not key.startswith(self.prefix):
      raise KeyError(key)
    return self.tensors[key[len(self.prefix):]]

  def __iter__(self):
    return (self.prefix + k for k in self.tensors)

  def __len__(self):
    return len(self.tensors)


def _shapes(cfg) -> dict:
  from flax import nnx
  _, state = abstract_model(cfg)
  return {path: tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def read_weights(path: str, model_cfg, part: str | None = None) -> dict[tuple, np.ndarray]:
  """Flat {our path: array} from `path`; `part` = None (whole model), "llm" or "vision".

  For the whole model the checkpoint's own config.json decides the shapes (so a mismatch with
  the training config is reported by name, not as a reshape error); for a part, the training
  config's shapes are used and the part's keys must all be there with those shapes.
  """
  if part is None:
    cfg = checkpoint_model_config(path)
    tensors = SafetensorsDir(path, cfg.layout)
    return dict(params_from_hf(tensors, cfg, cfg.layout, _shapes(cfg)))
  if part not in ("llm", "vision"):
    raise ValueError(f"part={part!r}; use 'llm' or 'vision'")
  tensors = SafetensorsDir(path)
  if part == "vision":
    tensors = _Prefixed(tensors, VISION_PREFIX)
  wanted = [r for r in rules(model_cfg, "long_vita") if r.ours[0] == part]
  keys = {k for r in wanted for i in range(r.layers or 1)
          for k in rule_keys(r, i if r.layers else None)}
  present = set(tensors)
  missing = sorted(k for k in keys if k not in present)
  if missing:
    shown = ", ".join(missing[:10]) + (f" ... and {len(missing) - 10} more"
                                       if len(missing) > 10 else "")
    kind = "Qwen2" if part == "llm" else "InternViT (OpenGVLab layout)"
    raise ValueError(f"{path} lacks {len(missing)} {part} tensors the config needs ({shown}); "
                     f"is it a {kind} directory of the configured size?")
  shapes = _shapes(model_cfg)
  try:
    return dict(params_from_hf(tensors, model_cfg, "long_vita", shapes, parts=(part,)))
  except ValueError as e:
    raise ValueError(f"{path}: its {part} weights do not fit the configured shapes ({e}); "
                     "check the model size in the config") from e
