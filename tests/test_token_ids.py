"""Special-token ids travel with checkpoints: read from config.json, else from the checkpoint's
tokenizer (visual tokens added in order where absent), else the Qwen2.5 ids with a warning;
both writers keep them, in both layouts, and both frameworks read them the same way."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import vita_jax
from configs import base
from vita_jax.data.tokenizer import load_tokenizer, token_ids, train_demo_tokenizer
from vita_jax.models.vlm import LongVITA
from vita_jax.spec import model as spec_model
from vita_jax.spec import tokens as spec_tokens

TOKEN_FIELDS = ("eos_id", "pad_id", "img_start_id", "img_end_id", "img_context_id",
                "vid_start_id", "vid_end_id", "vid_context_id", "patch_start_id",
                "patch_end_id", "patch_context_id")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A 300-token byte-level BPE whose special tokens take ids 0..19 (not Qwen2.5's)."""
  path = str(tmp_path_factory.mktemp("tok"))
  texts = ["what colour is the square", "a red circle and a blue triangle"] * 50
  train_demo_tokenizer(texts, path, vocab_size=300)
  return path


def small_model(tokenizer_dir):
  cfg = base.model_config("tiny")
  cfg.vision = spec_model.vision_config(28, 7, hidden=16, layers=1, heads=2, mlp=32)
  cfg.llm = spec_model.llm_config(vocab=320, hidden=24, layers=1, heads=3, kv_heads=1, ffn=40)
  cfg.projector.hidden_size = 24
  cfg.compute_dtype, cfg.remat = "float32", "none"
  for key, value in token_ids(load_tokenizer(tokenizer_dir)).items():
    cfg.tokens[key] = value
  return LongVITA(cfg, rngs=nnx.Rngs(0))


def logits(model):
  cfg = model.config
  ids = np.arange(30, 44, dtype=np.int32)[None].repeat(2, 0)
  ids[0, 1:5] = cfg.tokens.img_context_id          # one 28-px tile = 4 tokens
  ids[1, 2:6] = cfg.tokens.vid_context_id
  pixels = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
  return np.asarray(model(ids, pixels))


def tokens_of(cfg) -> dict:
  return {k: int(cfg.tokens[k]) for k in TOKEN_FIELDS}


def release_dir(model, path, tokenizer_dir=None):
  """A long_vita directory as the release ships it: no vita_special_tokens in config.json."""
  vita_jax.save_pretrained(model, path, layout="long_vita")
  file = os.path.join(path, "config.json")
  with open(file) as f:
    hf = json.load(f)
  del hf["vita_special_tokens"]
  with open(file, "w") as f:
    json.dump(hf, f)
  if tokenizer_dir:
    for name in os.listdir(tokenizer_dir):
      shutil.copy(os.path.join(tokenizer_dir, name), path)
  return path


def test_release_layout_on_another_vocabulary_takes_the_tokenizer_ids(tokenizer_dir, tmp_path):
  model = small_model(tokenizer_dir)
  path = release_dir(model, str(tmp_path / "release"), tokenizer_dir)
  loaded = vita_jax.load_pretrained(path)
  assert tokens_of(loaded.config) == tokens_of(model.config)
  assert loaded.config.tokens.img_context_id < 20          # not 151667
  np.testing.assert_allclose(logits(loaded), logits(model), rtol=0, atol=1e-5)


def test_torch_mirror_reads_the_same_ids(tokenizer_dir, tmp_path):
  torch = pytest.importorskip("torch")
  import vita_torch
  model = small_model(tokenizer_dir)
  path = release_dir(model, str(tmp_path / "release"), tokenizer_dir)
  mirror = vita_torch.load_pretrained(path, dtype=torch.float32, device="cpu")
  assert tokens_of(mirror.cfg) == tokens_of(model.config)


def test_a_tokenizer_passed_separately_is_used(tokenizer_dir, tmp_path):
  model = small_model(tokenizer_dir)
  path = release_dir(model, str(tmp_path / "release"))                  # no tokenizer inside
  loaded = vita_jax.load_pretrained(path, tokenizer=tokenizer_dir)
  assert tokens_of(loaded.config) == tokens_of(model.config)


def test_without_any_tokenizer_the_qwen_ids_apply_with_a_warning(tokenizer_dir, tmp_path, capfd):
  model = small_model(tokenizer_dir)
  path = release_dir(model, str(tmp_path / "release"))
  cfg = vita_jax.load_pretrained(path).config
  assert cfg.tokens.img_start_id == spec_tokens.QWEN_FIRST_VISUAL_ID
  err = capfd.readouterr().err
  assert "warning:" in err and "no vita_special_tokens" in err and path in err


@pytest.mark.parametrize("layout", ["internvl", "long_vita"])
def test_every_writer_keeps_the_ids(layout, tokenizer_dir, tmp_path):
  model = small_model(tokenizer_dir)
  model.config.projector.bias = True
  model = LongVITA(model.config, rngs=nnx.Rngs(0))      # internvl needs projector biases
  first = str(tmp_path / "first")
  vita_jax.save_pretrained(model, first, layout=layout)
  back = vita_jax.load_pretrained(first)
  assert tokens_of(back.config) == tokens_of(model.config)
  other = "long_vita" if layout == "internvl" else "internvl"
  second = str(tmp_path / "second")
  vita_jax.save_pretrained(back, second, layout=other)
  again = vita_jax.load_pretrained(second)
  assert tokens_of(again.config) == tokens_of(model.config)
  np.testing.assert_allclose(logits(again), logits(model), rtol=0, atol=1e-5)
  jax.clear_caches()
