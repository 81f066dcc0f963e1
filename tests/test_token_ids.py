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


@pytest.mark.slow
def test_ids_and_tokenizer_survive_the_conversion_chain(tokenizer_dir, tmp_path, capsys):
  """A user's chain on a non-Qwen vocabulary: long_vita (with its tokenizer) -> internvl ->
  long_vita with `vita_jax.convert`. Each hop copies the tokenizer files and keeps the ids;
  generate-style loading with an image works on the internvl hop (ids checked against the
  tokenizer), and verify runs its tokenized image prompt there, JAX against torch."""
  from vita_jax import cli, convert, verify
  from vita_jax.generate import build_prompt, load_for_inference
  model = small_model(tokenizer_dir)
  first, ivl, back = (str(tmp_path / n) for n in ("first", "ivl", "back"))
  vita_jax.save_pretrained(model, first, layout="long_vita")
  for name in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, name), first)
  run = lambda *a: cli.invoke(convert.main, convert.FLAGS, ["convert", *a])  # noqa: E731
  assert run(first, ivl, "--layout=internvl") == 0
  assert run(ivl, back, "--layout=long_vita") == 0
  for d in (ivl, back):
    assert os.path.isfile(os.path.join(d, "tokenizer.json")), os.listdir(d)
  assert tokens_of(vita_jax.load_pretrained(back).config) == tokens_of(model.config)

  loaded, tok = load_for_inference(ivl)
  ids, pixels = build_prompt(loaded, tok, "<image>\nwhat colour is the square",
                             images=[_wide_image(tmp_path, model.config.vision.image_size)])
  assert pixels.shape[0] == 3                       # thumbnail + 2 tiles, one block each
  assert np.isin(ids, [loaded.config.tokens.img_context_id,
                       loaded.config.tokens.patch_context_id]).sum() == 3 * 4
  assert np.isfinite(np.asarray(loaded(ids, pixels))).all()

  rows = verify.verify(ivl, "float32", ["torch"], out=print)
  assert {r["case"] for r in rows} >= {"prompt"} and all(r["ok"] for r in rows), rows


def _wide_image(tmp_path, side):
  from PIL import Image
  pixels = np.zeros((side, 2 * side, 3), np.uint8)
  pixels[:, :side, 0] = 220
  Image.fromarray(pixels).save(tmp_path / "wide.png")
  return str(tmp_path / "wide.png")
