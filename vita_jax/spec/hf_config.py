"""config.json <-> our model ConfigDict, for both HF layouts (docs/design.md#contracts).

`long_vita` schema (the release's, plus optional fields it lacks, all written by us):

    {"architectures": ["LongVITAForCausalLM"], "model_type": "long_vita",
     <Qwen2 text fields at top level: vocab_size, hidden_size, num_hidden_layers,
      num_attention_heads, num_key_value_heads, head_dim, intermediate_size, rms_norm_eps,
      rope_theta, tie_word_embeddings, eos_token_id, pad_token_id>,
     "visual": {<OpenGVLab InternVisionConfig: hidden_size, image_size, patch_size,
                 intermediate_size, num_attention_heads, num_hidden_layers, layer_norm_eps,
                 qkv_bias, qk_normalization, norm_type, hidden_act, initializer_factor>},
     "downsample_ratio": 0.5,                                          # optional, default 0.5
     "vision_projection": {"hidden_size": .., "bias": .., "layer_norm_eps": ..},
                           # optional; release default: visual hidden_size, no bias, 1e-5
     "vita_special_tokens": {"img_context_id": .., ...}}
                           # optional; default: the Qwen2.5 ids of docs/design.md#tokens

`internvl`: transformers' `InternVLConfig` (text_config = Qwen2, vision_config =
InternVLVisionConfig). Its single `image_token_id` becomes `tokens.image_token_id`.
"""

from __future__ import annotations

import sys

from vita_jax.spec import tokens as spec_tokens
from vita_jax.spec.model import llm_config, model_config, vision_config

_VITA_TOKEN_FIELDS = ("eos_id", "pad_id", "img_start_id", "img_end_id", "img_context_id",
                      "vid_start_id", "vid_end_id", "vid_context_id", "patch_start_id",
                      "patch_end_id", "patch_context_id", "image_token_id")


def detect_layout(hf: dict) -> str:
  archs = hf.get("architectures") or []
  if "LongVITAForCausalLM" in archs or hf.get("model_type") == "long_vita":
    return "long_vita"
  if "InternVLForConditionalGeneration" in archs or hf.get("model_type") == "internvl":
    return "internvl"
  raise ValueError(f"config.json has architectures={archs} and model_type="
                   f"{hf.get('model_type')!r}; expected LongVITAForCausalLM (long_vita layout) or "
                   "InternVLForConditionalGeneration (internvl layout)")


def _require(cond: bool, what: str):
  if not cond:
    raise ValueError(f"unsupported checkpoint: {what}")


def _side(v) -> int:
  if isinstance(v, (list, tuple)):
    _require(v[0] == v[1], f"non-square size {v}")
    return int(v[0])
  return int(v)


def _rope_theta(text: dict) -> float:
  rope = text.get("rope_parameters") or {}
  scaling = text.get("rope_scaling") or {}
  kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  _require(kind == "default", f"rope_type {kind!r} (only plain RoPE is implemented)")
  return float(rope.get("rope_theta", text.get("rope_theta", 1e6)))


def _llm_from(text: dict, tie: bool):
  _require(text.get("hidden_act", "silu") == "silu", f"hidden_act {text.get('hidden_act')}")
  _require(not text.get("use_sliding_window", False), "sliding-window attention")
  heads = int(text["num_attention_heads"])
  llm = llm_config(int(text["vocab_size"]), int(text["hidden_size"]),
                   int(text["num_hidden_layers"]), heads,
                   int(text.get("num_key_value_heads") or heads), int(text["intermediate_size"]),
                   head_dim=text.get("head_dim"), tie=bool(tie))
  llm.rms_norm_eps = float(text.get("rms_norm_eps", 1e-6))
  llm.rope_theta = _rope_theta(text)
  if text.get("max_position_embeddings"):
    llm.max_position_embeddings = int(text["max_position_embeddings"])
  return llm


def _default_tokens(eos, pad):
  return spec_tokens.special_token_ids(
      spec_tokens.QWEN_FIRST_VISUAL_ID,
      eos_id=spec_tokens.QWEN_EOS_ID if eos is None else int(eos),
      pad_id=spec_tokens.QWEN_PAD_ID if pad is None else int(pad))


def _tokens(hf: dict, token_ids: dict | None, eos, pad, source: str):
  """config.model.tokens by the rule of model_config_from_hf."""
  tokens = _default_tokens(eos, pad)
  written = hf.get("vita_special_tokens") or {}
  if not written and not token_ids:
    print(f"warning: {source or 'the checkpoint'} has no vita_special_tokens in config.json and "
          "no tokenizer; assuming the Qwen2.5 ids (<img>=151665 ...). Pass the tokenizer "
          "directory (--tokenizer=DIR) if the model was built on another vocabulary.",
          file=sys.stderr)
  for key, value in {**(token_ids or {}), **written}.items():
    tokens[key] = int(value)
  return tokens


def _first(v):
  return v[0] if isinstance(v, (list, tuple)) else v


def model_config_from_hf(hf: dict, token_ids: dict | None = None, *, source: str = ""):
  """Our model ConfigDict (the vita_jax.spec.model schema) from an HF config.json dict.

  The special-token ids come from, in this order: the file's `vita_special_tokens` (written by
  every vita_jax writer, in both layouts); `token_ids` read off the checkpoint's tokenizer
  (vita_jax.data.tokenizer.token_ids: the visual tokens added in order where absent, as the
  release does); else the Qwen2.5 ids, with a warning naming `source`.
  """
  layout = detect_layout(hf)
  # Vision, LLM, projector and tokens are all replaced below, from the file.
  cfg = model_config(size="hf", layout=layout, vision=vision_config(448, 14, 1024, 24, 16, 4096),
                     llm=llm_config(152064, 5120, 48, 40, 8, 13824), projector_hidden=1024)
  if layout == "internvl":
    text, vis = hf["text_config"], hf["vision_config"]
    _require(text.get("model_type", "qwen2") == "qwen2", f"text model {text.get('model_type')}")
    _require(not vis.get("use_qk_norm", False), "vision use_qk_norm=True")
    _require(vis.get("use_mean_pooling", True), "vision use_mean_pooling=False (final norm)")
    _require(vis.get("norm_type", "layer_norm") == "layer_norm", f"norm {vis.get('norm_type')}")
    _require(vis.get("use_absolute_position_embeddings", True), "no absolute positions")
    _require(hf.get("vision_feature_layer", -1) == -1, "vision_feature_layer != -1")
    _require(hf.get("vision_feature_select_strategy", "default") == "default",
             "vision_feature_select_strategy != default")
    _require(hf.get("projector_hidden_act", "gelu") == "gelu", "projector act != gelu")
    cfg.llm = _llm_from(text, hf.get("tie_word_embeddings", True))
    qkv_bias = bool(vis.get("attention_bias", False))
    ls_init = float(vis.get("layer_scale_init_value", 0.1))
    cfg.projector = dict(hidden_size=cfg.llm.hidden_size, bias=True, pre_norm=True,
                         layer_norm_eps=1e-5)
    cfg.tokens = _tokens(hf, token_ids, _first(text.get("eos_token_id")),
                         text.get("pad_token_id"), source)
    # InternVL marks images with one token (also replaced by visual features).
    cfg.tokens.image_token_id = int(hf.get("image_token_id", cfg.tokens.img_context_id))
    if not hf.get("vita_special_tokens") and not token_ids:
      # A transformers InternVL checkpoint: its only visual token is the image token.
      cfg.tokens.img_context_id = cfg.tokens.image_token_id
      cfg.tokens.patch_context_id = cfg.tokens.vid_context_id = -1
  else:
    vis = hf.get("visual") or hf.get("vision_config")
    _require(vis is not None, "config.json has neither 'visual' nor 'vision_config'")
    _require(not vis.get("qk_normalization", False), "vision qk_normalization=True")
    _require(vis.get("norm_type", "layer_norm") == "layer_norm", f"norm {vis.get('norm_type')}")
    cfg.llm = _llm_from(hf, hf.get("tie_word_embeddings", False))
    qkv_bias = bool(vis.get("qkv_bias", True))
    ls_init = float(vis.get("initializer_factor", 0.1))
    proj = hf.get("vision_projection") or {}
    cfg.projector = dict(hidden_size=int(proj.get("hidden_size", vis["hidden_size"])),
                         bias=bool(proj.get("bias", False)), pre_norm=True,
                         layer_norm_eps=float(proj.get("layer_norm_eps", 1e-5)))
    cfg.tokens = _tokens(hf, token_ids, _first(hf.get("eos_token_id")), hf.get("pad_token_id"),
                         source)
  _require(vis.get("hidden_act", "gelu") == "gelu", f"vision act {vis.get('hidden_act')}")
  cfg.vision = vision_config(_side(vis["image_size"]), _side(vis["patch_size"]),
                            int(vis["hidden_size"]), int(vis["num_hidden_layers"]),
                            int(vis["num_attention_heads"]), int(vis["intermediate_size"]))
  cfg.vision.layer_norm_eps = float(vis.get("layer_norm_eps", 1e-6))
  cfg.vision.qkv_bias = qkv_bias
  cfg.vision.layer_scale_init = ls_init
  cfg.downsample_ratio = float(hf.get("downsample_ratio", 0.5))
  return cfg


def _text_fields(cfg) -> dict:
  llm = cfg.llm
  return dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
              num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
              num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
              intermediate_size=llm.ffn_dim, rms_norm_eps=llm.rms_norm_eps, hidden_act="silu",
              tie_word_embeddings=bool(llm.tie_embeddings), use_sliding_window=False,
              max_position_embeddings=int(llm.max_position_embeddings),
              eos_token_id=_in_vocab(cfg.tokens.eos_id, llm.vocab_size),
              pad_token_id=_in_vocab(cfg.tokens.pad_id, llm.vocab_size))


def _in_vocab(token_id: int, vocab: int):
  """transformers refuses ids outside the vocabulary (tiny test models): write null."""
  return int(token_id) if 0 <= token_id < vocab else None


def hf_config_from_model_config(cfg, layout: str, dtype: str = "float32") -> dict:
  """The config.json dict for `cfg` written in `layout`."""
  v = cfg.vision
  if layout == "long_vita":
    return dict(
        architectures=["LongVITAForCausalLM"], model_type="long_vita", torch_dtype=dtype,
        **_text_fields(cfg), rope_theta=cfg.llm.rope_theta,
        visual=dict(architectures=["InternVisionModel"], model_type="intern_vit_6b",
                    hidden_size=v.hidden_size, image_size=v.image_size, patch_size=v.patch_size,
                    intermediate_size=v.mlp_dim, num_attention_heads=v.num_heads,
                    num_hidden_layers=v.num_layers, layer_norm_eps=v.layer_norm_eps,
                    qkv_bias=bool(v.qkv_bias), qk_normalization=False, norm_type="layer_norm",
                    hidden_act="gelu", initializer_factor=v.layer_scale_init, num_channels=3),
        downsample_ratio=cfg.downsample_ratio,
        vision_projection=dict(hidden_size=cfg.projector.hidden_size,
                               bias=bool(cfg.projector.bias),
                               layer_norm_eps=cfg.projector.layer_norm_eps),
        vita_special_tokens={k: int(cfg.tokens[k]) for k in _VITA_TOKEN_FIELDS
                             if k in cfg.tokens})
  if layout == "internvl":
    if cfg.projector.hidden_size != cfg.llm.hidden_size:
      raise ValueError(
          f"the internvl layout needs projector.hidden_size == llm.hidden_size, but this model "
          f"has {cfg.projector.hidden_size} != {cfg.llm.hidden_size} (the Long-VITA release "
          "projector); save it with layout='long_vita'")
    if abs(cfg.projector.layer_norm_eps - 1e-5) > 1e-12:
      raise ValueError(f"the internvl layout fixes the projector LayerNorm eps at 1e-5; this "
                       f"model uses {cfg.projector.layer_norm_eps}; use layout='long_vita'")
    image_token = cfg.tokens.get("image_token_id", -1)
    image_token = cfg.tokens.img_context_id if image_token < 0 else image_token
    text = dict(model_type="qwen2", **_text_fields(cfg),
                rope_parameters=dict(rope_theta=cfg.llm.rope_theta, rope_type="default"))
    return dict(
        architectures=["InternVLForConditionalGeneration"], model_type="internvl", dtype=dtype,
        text_config=text,
        vision_config=dict(
            model_type="internvl_vision", hidden_size=v.hidden_size,
            image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
            intermediate_size=v.mlp_dim, num_attention_heads=v.num_heads,
            num_hidden_layers=v.num_layers, layer_norm_eps=v.layer_norm_eps,
            attention_bias=bool(v.qkv_bias), use_qk_norm=False, norm_type="layer_norm",
            hidden_act="gelu", layer_scale_init_value=v.layer_scale_init, num_channels=3,
            use_mean_pooling=True, use_absolute_position_embeddings=True,
            use_mask_token=False),
        image_token_id=int(image_token), image_seq_length=spec_tokens.tokens_per_tile(cfg),
        # Not read by transformers; keeps every Long-VITA token id through a conversion.
        vita_special_tokens={k: int(cfg.tokens[k]) for k in _VITA_TOKEN_FIELDS
                             if k in cfg.tokens},
        downsample_ratio=cfg.downsample_ratio, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=bool(cfg.llm.tie_embeddings))
  raise ValueError(f"unknown layout {layout!r}; use long_vita or internvl")
