"""vita_torch's reader (and writer) of Hugging Face directories (docs/design.md#contracts).

Two layouts, told apart by `config.json`:
  long_vita  the release (`LongVITAForCausalLM`): Qwen2 fields at the top, InternViT fields under
             `visual`; weights `model.vision_model.*` (OpenGVLab InternViT names, fused qkv),
             `model.vision_projection.{pre_proj_layernorm,mlp.0,mlp.2}`, `model.layers.N.*`,
             `model.norm`, `lm_head.weight`.
  internvl   transformers' `InternVLForConditionalGeneration` (`text_config` / `vision_config`).

vita_torch's modules are named after the long_vita keys, so loading long_vita is the identity
and internvl is a rename (vita_jax's key tables) plus a q/k/v concatenation.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

# config.json <-> ConfigDict, the key tables and the safetensors reader are vita_jax's (no JAX
# import), so both frameworks read a checkpoint the same way.
from vita_jax.data.tokenizer import checkpoint_model_config
from vita_jax.spec.hf_config import hf_config_from_model_config
from vita_jax.spec.hf_files import SafetensorsDir
from vita_jax.spec.hf_mapping import canonical_key, ignorable_keys, rule_keys, rules


def to_long_vita_keys(state: dict[str, torch.Tensor], cfg, layout: str) -> dict:
  """Rename a state dict of `layout` (on-disk or in-memory keys) to long_vita keys.

  Walks vita_jax's key tables (`hf_mapping.rules`) of both layouts side by side, so the two
  frameworks share one table; transformers' separate q/k/v concatenate into `attn.qkv`.
  """
  if layout == "long_vita":
    return dict(state)
  state = {canonical_key(k, layout): v for k, v in state.items()}
  target = {r.ours: r for r in rules(cfg, "long_vita")}
  out, used = {}, set()
  for rule in rules(cfg, layout):
    for i in range(rule.layers or 1):
      layer = i if rule.layers else None
      src, dst = rule_keys(rule, layer), rule_keys(target[rule.ours], layer)
      missing = [k for k in src if k not in state]
      if missing:
        raise KeyError(f"the {layout} checkpoint lacks {', '.join(missing)}")
      if len(dst) == 1:
        parts = [state[k] for k in src]
        out[dst[0]] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
      elif dst or src:
        raise ValueError(f"cannot map {src} to {dst}")
      used.update(src)
  extra = sorted(set(state) - used - ignorable_keys(cfg))
  if extra:
    raise KeyError(f"unexpected tensors in the {layout} checkpoint: {', '.join(extra[:10])}")
  return out


def read_checkpoint(path: str, tokenizer: str = ""):
  """(model ConfigDict, state dict with long_vita keys) of an HF directory of either layout;
  token ids as vita_jax.data.tokenizer.checkpoint_model_config reads them."""
  cfg = checkpoint_model_config(path, tokenizer)
  state = dict(SafetensorsDir(path, framework="pt"))   # sharded or not, via the index
  return cfg, to_long_vita_keys(state, cfg, cfg.layout)


def save_long_vita(cfg, state: dict[str, torch.Tensor], path: str) -> None:
  """Write config.json + model.safetensors in the long_vita layout."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config_from_model_config(cfg, "long_vita"), f, indent=2)
  save_file({k: t.detach().contiguous().cpu() for k, t in state.items()},
            os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
