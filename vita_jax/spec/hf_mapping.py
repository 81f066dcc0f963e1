"""Key tables between our parameters and the two Hugging Face layouts (docs/design.md#contracts).

A `Rule` ties one of our parameters (a path in the nnx state, stacked over layers or not) to
the HF tensor(s) it comes from. Conversion is the table plus three transforms: Linear
[out, in] <-> kernel [in, ..., out ...], conv OIHW <-> HWIO, and reshapes. Fused tensors
(`attn.qkv`) map to one of our kernels; transformers' separate q/k/v concatenate into it.

    for path, array in params_from_hf(tensors, cfg, "internvl"): ...     # streaming
    for key, array in params_to_hf(flat_params, cfg, "long_vita"): ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np

LAYOUTS = ("long_vita", "internvl")
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: Path                     # path in the nnx state
  hf: tuple[str, ...]            # HF key templates; "{i}" = layer index. () = not stored
  load: Callable                 # (list of HF arrays, our per-layer shape) -> our array
  save: Callable                 # our per-layer array -> list of HF arrays
  layers: int = 0                # stacked over this many layers (0 = not stacked)


def _linear(n_in: int = 1, parts: int = 1):
  """Linear weight(s) [out, in] <-> kernel [in..., out...] with n_in leading input dims."""
  def load(ws, shape):
    w = np.concatenate(ws, axis=0) if len(ws) > 1 else ws[0]
    return w.T.reshape(shape)

  def save(x):
    w = x.reshape(math.prod(x.shape[:n_in]), -1).T
    n = w.shape[0] // parts
    return [w[i * n:(i + 1) * n] for i in range(parts)]
  return load, save


def _vector(parts: int = 1, hf_shape: Callable | None = None):
  """Biases, norms, embeddings: a reshape (and a split for fused tensors)."""
  def load(ws, shape):
    flat = np.concatenate([w.reshape(-1) for w in ws]) if len(ws) > 1 else ws[0]
    return flat.reshape(shape)

  def save(x):
    if parts == 1:
      return [x.reshape(hf_shape(x.shape)) if hf_shape else x]
    flat = x.reshape(-1)
    n = flat.shape[0] // parts
    return [flat[i * n:(i + 1) * n] for i in range(parts)]
  return load, save


def _linear_zero_bias():
  load, save = _linear()
  return (lambda ws, shape: load(ws[:1], shape),
          lambda x: save(x) + [np.zeros(x.shape[-1], x.dtype)])


def _conv():
  return (lambda ws, shape: ws[0].transpose(2, 3, 1, 0).reshape(shape),
          lambda x: [x.transpose(3, 2, 0, 1)])


def _zeros():
  """A parameter the layout does not store (e.g. absent biases): zeros on load."""
  return (lambda ws, shape: np.zeros(shape, np.float32), lambda x: [])


_TOKEN_SHAPE = lambda shape: (1, 1) + tuple(shape)       # [D] <-> [1, 1, D]
_TABLE_SHAPE = lambda shape: (1,) + tuple(shape)         # [N, D] <-> [1, N, D]
_FLAT = lambda shape: (math.prod(shape),)                 # [H, hd] <-> [H * hd]


def _names(layout: str) -> dict:
  """HF names of one layout. Vision/projector names differ; the Qwen2 names are shared."""
  if layout == "long_vita":
    v, blk = "model.vision_model.", "model.vision_model.encoder.layers.{i}."
    return dict(
        patch=v + "embeddings.patch_embedding.", cls=v + "embeddings.class_embedding",
        pos=v + "embeddings.position_embedding", norm1=blk + "norm1.", norm2=blk + "norm2.",
        qkv=(blk + "attn.qkv.",), proj=blk + "attn.proj.", ls1=blk + "ls1", ls2=blk + "ls2",
        fc1=blk + "mlp.fc1.", fc2=blk + "mlp.fc2.",
        pnorm="model.vision_projection.pre_proj_layernorm.",
        p1="model.vision_projection.mlp.0.", p2="model.vision_projection.mlp.2.", llm="model.")
  if layout == "internvl":
    v, blk = "model.vision_tower.", "model.vision_tower.encoder.layer.{i}."
    return dict(
        patch=v + "embeddings.patch_embeddings.projection.", cls=v + "embeddings.cls_token",
        pos=v + "embeddings.position_embeddings", norm1=blk + "layernorm_before.",
        norm2=blk + "layernorm_after.",
        qkv=tuple(blk + f"attention.{n}_proj." for n in "qkv"),
        proj=blk + "attention.projection_layer.", ls1=blk + "lambda_1", ls2=blk + "lambda_2",
        fc1=blk + "mlp.fc1.", fc2=blk + "mlp.fc2.", pnorm="model.multi_modal_projector.layer_norm.",
        p1="model.multi_modal_projector.linear_1.", p2="model.multi_modal_projector.linear_2.",
        llm="model.language_model.")
  raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")


def rules(cfg, layout: str) -> list[Rule]:
  """The full table for model config `cfg` in `layout`."""
  n = _names(layout)
  lv, ll = cfg.vision.num_layers, cfg.llm.num_layers
  parts = len(n["qkv"])
  out = [
      Rule(("vision", "patch_kernel"), (n["patch"] + "weight",), *_conv()),
      Rule(("vision", "patch_bias"), (n["patch"] + "bias",), *_vector()),
      Rule(("vision", "cls_token"), (n["cls"],), *_vector(hf_shape=_TOKEN_SHAPE)),
      Rule(("vision", "pos_embed"), (n["pos"],), *_vector(hf_shape=_TABLE_SHAPE)),
  ]
  vis = lambda name, keys, fns: Rule(("vision", "layers", name), keys, *fns, layers=lv)
  qkv_bias = (tuple(k + "bias" for k in n["qkv"]), _vector(parts, _FLAT)) \
      if cfg.vision.qkv_bias \
      else ((), _zeros())
  out += [
      vis("norm1_scale", (n["norm1"] + "weight",), _vector()),
      vis("norm1_bias", (n["norm1"] + "bias",), _vector()),
      vis("qkv_kernel", tuple(k + "weight" for k in n["qkv"]), _linear(1, parts)),
      vis("qkv_bias", *qkv_bias),
      vis("proj_kernel", (n["proj"] + "weight",), _linear(2)),
      vis("proj_bias", (n["proj"] + "bias",), _vector()),
      vis("ls1", (n["ls1"],), _vector()),
      vis("norm2_scale", (n["norm2"] + "weight",), _vector()),
      vis("norm2_bias", (n["norm2"] + "bias",), _vector()),
      vis("fc1_kernel", (n["fc1"] + "weight",), _linear()),
      vis("fc1_bias", (n["fc1"] + "bias",), _vector()),
      vis("fc2_kernel", (n["fc2"] + "weight",), _linear()),
      vis("fc2_bias", (n["fc2"] + "bias",), _vector()),
      vis("ls2", (n["ls2"],), _vector()),
      Rule(("projector", "norm_scale"), (n["pnorm"] + "weight",), *_vector()),
      Rule(("projector", "norm_bias"), (n["pnorm"] + "bias",), *_vector()),
  ]
  if layout == "internvl" and not cfg.projector.bias:
    # transformers' projector always has biases: a bias-free projector is saved with zeros.
    out += [Rule(("projector", f"fc{j}_kernel"), (n[f"p{j}"] + "weight", n[f"p{j}"] + "bias"),
                 *_linear_zero_bias()) for j in (1, 2)]
  else:
    out += [Rule(("projector", f"fc{j}_kernel"), (n[f"p{j}"] + "weight",), *_linear())
            for j in (1, 2)]
  if cfg.projector.bias:
    out += [Rule(("projector", "fc1_bias"), (n["p1"] + "bias",), *_vector()),
            Rule(("projector", "fc2_bias"), (n["p2"] + "bias",), *_vector())]
  m = n["llm"]
  blk = m + "layers.{i}."
  dec = lambda name, key, fns: Rule(("llm", "layers", name), (blk + key,), *fns, layers=ll)
  out += [
      Rule(("llm", "embedding"), (m + "embed_tokens.weight",), *_vector()),
      dec("attn_norm", "input_layernorm.weight", _vector()),
      dec("q_kernel", "self_attn.q_proj.weight", _linear()),
      dec("q_bias", "self_attn.q_proj.bias", _vector(hf_shape=_FLAT)),
      dec("k_kernel", "self_attn.k_proj.weight", _linear()),
      dec("k_bias", "self_attn.k_proj.bias", _vector(hf_shape=_FLAT)),
      dec("v_kernel", "self_attn.v_proj.weight", _linear()),
      dec("v_bias", "self_attn.v_proj.bias", _vector(hf_shape=_FLAT)),
      dec("o_kernel", "self_attn.o_proj.weight", _linear(2)),
      dec("mlp_norm", "post_attention_layernorm.weight", _vector()),
      dec("gate_kernel", "mlp.gate_proj.weight", _linear()),
      dec("up_kernel", "mlp.up_proj.weight", _linear()),
      dec("down_kernel", "mlp.down_proj.weight", _linear()),
      Rule(("llm", "final_norm"), (m + "norm.weight",), *_vector()),
  ]
  if not cfg.llm.tie_embeddings:
    out.append(Rule(("llm", "lm_head"), ("lm_head.weight",), *_linear()))
  return out


def rule_keys(rule: Rule, i: int | None = None) -> list[str]:
  return [k.format(i=i) for k in rule.hf]


def ignorable_keys(cfg) -> set[str]:
  """HF keys that may be present but are not used (a tied head saved anyway)."""
  return {"lm_head.weight"} if cfg.llm.tie_embeddings else set()


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg, layout: str,
                   shapes: Mapping[Path, tuple[int, ...]], dtype=None, parts=None
                   ) -> Iterator[tuple[Path, np.ndarray]]:
  """Yield (our path, array) one parameter at a time, reading `tensors` lazily.

  `shapes` gives our full shapes (e.g. from an abstract model); stacked parameters are filled
  layer by layer, so at most one HF tensor beyond the parameter being built is in memory.
  `parts` (e.g. ("llm",)) limits the table to those top-level modules.
  """
  for rule in rules(cfg, layout):
    if parts is not None and rule.ours[0] not in parts:
      continue
    shape = tuple(shapes[rule.ours])
    if not rule.layers:
      arr = rule.load([tensors[k] for k in rule_keys(rule)], shape)
      yield rule.ours, arr if dtype is None else arr.astype(dtype)
      continue
    out = None
    for i in range(rule.layers):
      layer = rule.load([tensors[k] for k in rule_keys(rule, i)], shape[1:])
      if out is None:
        out = np.empty(shape, dtype or layer.dtype)
      out[i] = layer
    yield rule.ours, out


def params_to_hf(flat_params: Mapping[Path, np.ndarray], cfg, layout: str
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (HF key, array) for every stored tensor of `layout`, one parameter at a time."""
  for rule in rules(cfg, layout):
    arr = flat_params[rule.ours]
    for i in range(rule.layers or 1):
      layer = arr[i] if rule.layers else arr
      yield from zip(rule_keys(rule, i if rule.layers else None), rule.save(layer))


def hf_to_flat_params(tensors: Mapping[str, np.ndarray], cfg, layout: str,
                      shapes: Mapping[Path, tuple[int, ...]], dtype=None
                      ) -> dict[Path, np.ndarray]:
  """{HF key: array} -> {our path: array} (the whole model in memory)."""
  return dict(params_from_hf(tensors, cfg, layout, shapes, dtype))


def flat_params_to_hf(flat_params: Mapping[Path, np.ndarray], cfg, layout: str
                      ) -> dict[str, np.ndarray]:
  """{our path: array} -> {HF key: array} (the whole model in memory)."""
  return {k: np.ascontiguousarray(v) for k, v in params_to_hf(flat_params, cfg, layout)}


# transformers 5 keeps `model.language_model.*` in memory but reads and writes the older llava
# names on disk (`language_model.model.*`, `language_model.lm_head`, `vision_tower.*`,
# `multi_modal_projector.*`). The tables above use the in-memory names; files use these.
_INTERNVL_DISK = (("model.language_model.", "language_model.model."),
                  ("lm_head.", "language_model.lm_head."),
                  ("model.vision_tower.", "vision_tower."),
                  ("model.multi_modal_projector.", "multi_modal_projector."))


def disk_key(key: str, layout: str) -> str:
  """The name `key` is stored under in a file of `layout`."""
  if layout == "internvl":
    for memory, disk in _INTERNVL_DISK:
      if key.startswith(memory):
        return disk + key[len(memory):]
  return key


def canonical_key(key: str, layout: str) -> str:
  """Inverse of `disk_key`; also accepts keys already in the in-memory form."""
  if layout == "internvl":
    for memory, disk in _INTERNVL_DISK:
      if key.startswith(disk):
        return memory + key[len(disk):]
  return key
