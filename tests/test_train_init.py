"""Stage chaining: starting weights from a Qwen2 `transformers` directory plus an InternViT
directory (stage 1), from a whole HF checkpoint, and refusals of mismatched sources."""

import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from configs import stage1, stage2
from vita_jax import save_pretrained
from vita_jax.checkpoints.init_sources import VISION_PREFIX
from vita_jax.errors import ConfigError
from vita_jax.spec.hf_files import SafetensorsDir
from vita_jax.train import build_model, load_initial_weights

transformers = pytest.importorskip("transformers")


def _flat(model, part):
  state = nnx.state(getattr(model, part), nnx.Param)
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _qwen2_dir(tmp_path, llm_cfg):
  config = transformers.Qwen2Config(
      vocab_size=llm_cfg.vocab_size, hidden_size=llm_cfg.hidden_size,
      intermediate_size=llm_cfg.ffn_dim, num_hidden_layers=llm_cfg.num_layers,
      num_attention_heads=llm_cfg.num_heads, num_key_value_heads=llm_cfg.num_kv_heads,
      rms_norm_eps=llm_cfg.rms_norm_eps, rope_theta=llm_cfg.rope_theta,
      tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).eval()
  path = str(tmp_path / "qwen2")
  model.save_pretrained(path)
  return path, model


def _internvit_dir(tmp_path, config):
  """An OpenGVLab-layout InternViT directory: a donor model's vision tensors, unprefixed."""
  donor_cfg = stage2.get_config("tiny")
  donor_cfg.train.seed = 7
  donor = build_model(donor_cfg, None)
  full = str(tmp_path / "donor")
  save_pretrained(donor, full, layout="long_vita")
  tensors = SafetensorsDir(full)
  vision = {k[len(VISION_PREFIX):]: np.ascontiguousarray(tensors[k]) for k in tensors
            if k.startswith(VISION_PREFIX)}
  path = str(tmp_path / "internvit")
  os.makedirs(path)
  save_file(vision, os.path.join(path, "model.safetensors"))
  return path, donor


def test_stage1_starts_from_separate_llm_and_vision_dirs(tmp_path):
  config = stage1.get_config("tiny")
  qwen_path, qwen = _qwen2_dir(tmp_path, config.model.llm)
  vit_path, donor = _internvit_dir(tmp_path, config)
  config.init_from_llm, config.init_from_vision = qwen_path, vit_path
  model = build_model(config, None)
  fresh_projector = _flat(model, "projector")
  load_initial_weights(config, model)

  llm = _flat(model, "llm")
  sd = {k: v.detach().numpy() for k, v in qwen.state_dict().items()}
  np.testing.assert_array_equal(llm[("embedding",)], sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(llm[("final_norm",)], sd["model.norm.weight"])
  np.testing.assert_array_equal(llm[("lm_head",)], sd["lm_head.weight"].T)
  q = sd["model.layers.2.self_attn.q_proj.weight"].T.reshape(llm[("layers", "q_kernel")][2].shape)
  np.testing.assert_array_equal(llm[("layers", "q_kernel")][2], q)
  down = sd["model.layers.3.mlp.down_proj.weight"].T
  np.testing.assert_array_equal(llm[("layers", "down_kernel")][3], down)

  for path, value in _flat(donor, "vision").items():
    np.testing.assert_array_equal(_flat(model, "vision")[path], value)
  for path, value in _flat(model, "projector").items():  # untouched: fresh init
    np.testing.assert_array_equal(value, fresh_projector[path])


def test_whole_model_from_hf_dir_and_mismatch_is_named(tmp_path):
  config = stage2.get_config("tiny")
  config.train.seed = 3
  source = build_model(config, None)
  path = str(tmp_path / "hf")
  save_pretrained(source, path, layout="long_vita")
  target_cfg = stage2.get_config("tiny")
  target_cfg.init_from = path
  target = build_model(target_cfg, None)
  load_initial_weights(target_cfg, target)
  for part in ("vision", "projector", "llm"):
    for p, v in _flat(source, part).items():
      np.testing.assert_array_equal(_flat(target, part)[p], v)

  wrong = stage2.get_config("tiny")
  wrong.model.llm.ffn_dim = 256
  wrong.init_from = path
  with pytest.raises(ValueError, match="shape mismatches: .*gate_kernel"):
    load_initial_weights(wrong, build_model(wrong, None))


def test_missing_and_wrong_sources_are_clear(tmp_path):
  config = stage1.get_config("tiny")
  config.init_from = str(tmp_path / "nope")
  with pytest.raises(ConfigError, match="does not exist"):
    load_initial_weights(config, build_model(config, None))
  config = stage1.get_config("tiny")
  empty = tmp_path / "emptyvit"
  empty.mkdir()
  save_file({"foo": np.zeros(2, np.float32)}, str(empty / "model.safetensors"))
  config.init_from_vision = str(empty)
  with pytest.raises(ValueError, match="lacks .* vision tensors .*InternViT"):
    load_initial_weights(config, build_model(config, None))
  assert jax.device_count() == 8
