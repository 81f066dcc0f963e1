"""vita_jax vs transformers' InternVLForConditionalGeneration (Qwen2 text) in fp32
(docs/design.md#precision).

Tiny random models with odd sizes (heads not a power of two, kv_heads < heads, vocab not a
multiple of 128, odd head counts in the ViT, 1 and 3 tiles, batch 2), saved with
transformers' own `save_pretrained`, loaded with `vita_jax.load_pretrained`. The release
(`long_vita`) layout is written by this file from the same weights with an independent key
table. Worst |delta| per comparison is printed and raised as a `ParityReport` warning, which
pytest lists in its warnings summary.
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import vita_jax  # noqa: E402
from vita_jax.models.projector import pixel_shuffle  # noqa: E402
from vita_jax.models.vision import bicubic_matrix  # noqa: E402

IMAGE_TOKEN = 7


class ParityReport(UserWarning):
  pass


CASES = {
    # 3 tiles, batch 2, untied head, kv_heads 1 < heads 3, vocab 301.
    "three_tiles": dict(
        vision=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                    intermediate_size=40, image_size=28, patch_size=7),
        text=dict(vocab_size=301, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=1, intermediate_size=50, rope_theta=1e4),
        tie=False, tiles=(2, 1)),
    # 1 tile, 6 heads (not a power of two) over 2 kv heads, 5 ViT heads, tied head.
    "one_tile_tied": dict(
        vision=dict(hidden_size=20, num_hidden_layers=1, num_attention_heads=5,
                    intermediate_size=24, image_size=56, patch_size=14),
        text=dict(vocab_size=250, hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=40, rope_theta=1e6),
        tie=True, tiles=(0, 1)),
}
# The release layout: projector width = ViT width and no projector biases, so the vision and
# text widths match and the transformers projector biases are zeroed.
RELEASE = dict(
    vision=dict(hidden_size=36, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=48, image_size=28, patch_size=7),
    text=dict(vocab_size=199, hidden_size=36, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=3, intermediate_size=44, rope_theta=1e6),
    tie=False, tiles=(1, 2))


def report(name: str, delta: float, scale: float):
  msg = f"parity {name}: worst |delta| = {delta:.3e} (max |ref| = {scale:.3g})"
  print(msg)
  warnings.warn(msg, ParityReport, stacklevel=2)


def assert_close(name, ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  delta, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
  report(name, delta, scale)
  assert delta <= 1e-4 * max(1.0, scale), f"{name}: |delta| {delta} > 1e-4 * {scale}"


def build_hf(spec, seed=0, zero_projector_bias=False):
  from transformers import InternVLConfig, InternVLForConditionalGeneration
  cfg = InternVLConfig(
      vision_config=dict(spec["vision"], attention_bias=True, layer_scale_init_value=0.1),
      text_config=dict(spec["text"], model_type="qwen2", tie_word_embeddings=spec["tie"]),
      image_token_id=IMAGE_TOKEN, downsample_ratio=0.5, tie_word_embeddings=spec["tie"])
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = InternVLForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
      p.copy_(base + 0.2 * torch.randn_like(p))
      if zero_projector_bias and "multi_modal_projector.linear" in name and "bias" in name:
        p.zero_()
  return model


def make_inputs(spec, seed=0):
  rng = np.random.default_rng(seed)
  v = spec["vision"]
  per_tile = (v["image_size"] // v["patch_size"] // 2) ** 2
  tiles = spec["tiles"]
  seq = max(tiles) * per_tile + 9
  ids = rng.integers(IMAGE_TOKEN + 1, spec["text"]["vocab_size"], (len(tiles), seq))
  for b, n in enumerate(tiles):
    ids[b, 3:3 + n * per_tile] = IMAGE_TOKEN
  pix = rng.standard_normal((sum(tiles), v["image_size"], v["image_size"], 3)).astype(np.float32)
  return ids.astype(np.int32), pix


def hf_logits(model, ids, pix):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 pixel_values=torch.tensor(pix).permute(0, 3, 1, 2)).logits.numpy()


def hf_vision(model, pix):
  with torch.no_grad():
    out = model.model.vision_tower(pixel_values=torch.tensor(pix).permute(0, 3, 1, 2))
    return out.last_hidden_state[:, 1:].numpy()


def jax_logits(model, ids, pix):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))
  return np.asarray(fn(state, ids, pix))


def jax_vision(model, pix):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, p: nnx.merge(graphdef, s).vision(p))(state, pix))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  spec = CASES[request.param]
  hf = build_hf(spec, seed=len(request.param))
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  return request.param, spec, hf, vita_jax.load_pretrained(path, dtype="float32"), path


def test_logits_match_transformers(case):
  name, spec, hf, ours, _ = case
  ids, pix = make_inputs(spec)
  assert_close(f"{name} logits", jax_logits(ours, ids, pix), hf_logits(hf, ids, pix))


def test_vision_tower_matches_transformers(case):
  name, spec, hf, ours, _ = case
  _, pix = make_inputs(spec)
  assert_close(f"{name} vision tower", jax_vision(ours, pix), hf_vision(hf, pix))


def test_position_embedding_resize_matches_transformers(case):
  """Tiles larger than the checkpoint's: bicubic resize of the learned position table."""
  name, spec, hf, ours, _ = case
  side = spec["vision"]["image_size"] + 2 * spec["vision"]["patch_size"]
  pix = np.random.default_rng(1).standard_normal((2, side, side, 3)).astype(np.float32)
  assert_close(f"{name} vision tower at {side}px", jax_vision(ours, pix), hf_vision(hf, pix))


def test_our_internvl_files_load_in_transformers(case, tmp_path):
  """save_pretrained(layout="internvl") is read by transformers to the same logits."""
  from transformers import InternVLForConditionalGeneration
  name, spec, hf, ours, _ = case
  vita_jax.save_pretrained(ours, str(tmp_path), layout="internvl")
  again = InternVLForConditionalGeneration.from_pretrained(str(tmp_path),
                                                           attn_implementation="eager").eval()
  ids, pix = make_inputs(spec, seed=3)
  assert_close(f"{name} transformers reload", hf_logits(again, ids, pix),
               hf_logits(hf, ids, pix))


def test_pixel_shuffle_channel_order_matches_transformers():
  from transformers.models.internvl.modeling_internvl import InternVLModel
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 5)).astype(np.float32)
  ref = InternVLModel.pixel_shuffle(None, torch.tensor(x), scale_factor=0.5).numpy()
  np.testing.assert_array_equal(np.asarray(pixel_shuffle(x, 0.5)), ref)


@pytest.mark.parametrize("n_in,n_out", [(4, 6), (6, 4), (5, 9), (32, 16)])
def test_bicubic_matrix_matches_torch(n_in, n_out):
  grid = np.random.default_rng(0).standard_normal((1, 3, n_in, n_in)).astype(np.float64)
  ref = torch.nn.functional.interpolate(torch.tensor(grid), size=(n_out, n_out), mode="bicubic",
                                        align_corners=False).numpy()
  m = bicubic_matrix(n_in, n_out)
  np.testing.assert_allclose(np.einsum("oh,bchw,pw->bcop", m, grid, m), ref, atol=1e-12)


def _release_tensors(hf) -> dict[str, np.ndarray]:
  """The Long-VITA release key names, built here independently of vita_jax's table."""
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  out = {}
  for k, v in sd.items():
    if k.startswith("model.language_model."):
      out["model." + k[len("model.language_model."):]] = v
    elif k == "lm_head.weight":
      out[k] = v
  vt = "model.vision_tower."
  vm = "model.vision_model."
  out[vm + "embeddings.class_embedding"] = sd[vt + "embeddings.cls_token"]
  out[vm + "embeddings.position_embedding"] = sd[vt + "embeddings.position_embeddings"]
  for p in ("weight", "bias"):
    patch = sd[vt + f"embeddings.patch_embeddings.projection.{p}"]
    out[vm + f"embeddings.patch_embedding.{p}"] = patch
  n_layers = hf.config.vision_config.num_hidden_layers
  for i in range(n_layers):
    src, dst = vt + f"encoder.layer.{i}.", vm + f"encoder.layers.{i}."
    for p in ("weight", "bias"):
      out[dst + f"attn.qkv.{p}"] = np.concatenate(
          [sd[src + f"attention.{n}_proj.{p}"] for n in "qkv"], axis=0)
      out[dst + f"attn.proj.{p}"] = sd[src + f"attention.projection_layer.{p}"]
      out[dst + f"norm1.{p}"] = sd[src + f"layernorm_before.{p}"]
      out[dst + f"norm2.{p}"] = sd[src + f"layernorm_after.{p}"]
      out[dst + f"mlp.fc1.{p}"] = sd[src + f"mlp.fc1.{p}"]
      out[dst + f"mlp.fc2.{p}"] = sd[src + f"mlp.fc2.{p}"]
    out[dst + "ls1"] = sd[src + "lambda_1"]
    out[dst + "ls2"] = sd[src + "lambda_2"]
  pj, vp = "model.multi_modal_projector.", "model.vision_projection."
  for p in ("weight", "bias"):
    out[vp + f"pre_proj_layernorm.{p}"] = sd[pj + f"layer_norm.{p}"]
  out[vp + "mlp.0.weight"] = sd[pj + "linear_1.weight"]
  out[vp + "mlp.2.weight"] = sd[pj + "linear_2.weight"]
  return out


def test_release_layout_checkpoint_matches_transformers(tmp_path):
  spec = RELEASE
  hf = build_hf(spec, seed=5, zero_projector_bias=True)
  v, t = spec["vision"], spec["text"]
  config = dict(
      architectures=["LongVITAForCausalLM"], model_type="long_vita", torch_dtype="float32",
      vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
      num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
      num_key_value_heads=t["num_key_value_heads"], intermediate_size=t["intermediate_size"],
      rms_norm_eps=1e-6, rope_theta=t["rope_theta"], tie_word_embeddings=False,
      hidden_act="silu", use_sliding_window=False,
      visual=dict(hidden_size=v["hidden_size"], image_size=v["image_size"],
                  patch_size=v["patch_size"], intermediate_size=v["intermediate_size"],
                  num_attention_heads=v["num_attention_heads"],
                  num_hidden_layers=v["num_hidden_layers"], layer_norm_eps=1e-6, qkv_bias=True,
                  qk_normalization=False, norm_type="layer_norm", hidden_act="gelu"),
      vita_special_tokens=dict(img_context_id=IMAGE_TOKEN))
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(config, f)
  tensors = {k: np.ascontiguousarray(v) for k, v in _release_tensors(hf).items()}
  keys = sorted(tensors)
  save_file({k: tensors[k] for k in keys[::2]}, os.path.join(tmp_path, "a.safetensors"))
  save_file({k: tensors[k] for k in keys[1::2]}, os.path.join(tmp_path, "b.safetensors"))
  with open(os.path.join(tmp_path, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {k: "a.safetensors" if i % 2 == 0 else "b.safetensors"
                              for i, k in enumerate(keys)}}, f)
  ours = vita_jax.load_pretrained(str(tmp_path))
  assert ours.config.layout == "long_vita" and ours.config.projector.bias is False
  ids, pix = make_inputs(spec)
  assert_close("release layout logits", jax_logits(ours, ids, pix), hf_logits(hf, ids, pix))
