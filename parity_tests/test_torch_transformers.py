"""vita_torch vs transformers' InternVLForConditionalGeneration on a tiny random checkpoint,
loaded from both HF layouts: logits (fp32 and bf16, text / 1 / 3 tiles, batch 2), the vision
features, packing, and greedy generation (docs/design.md#precision tolerances)."""

from __future__ import annotations

import pytest
import torch

from vita_torch import load_pretrained, testing
from vita_torch.generate import generate

FP32_TOL = 1e-4          # x max(1, max|logit|)
BF16_TOL = 2e-2


def _tol(ref, rel):
  return rel * max(1.0, ref.abs().max().item())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """The transformers model (fp32) and its directories in both layouts."""
  internvl = str(tmp_path_factory.mktemp("internvl"))
  hf = testing.make_internvl_checkpoint(internvl, seed=0)
  long_vita = str(tmp_path_factory.mktemp("long_vita"))
  testing.to_long_vita(internvl, long_vita)
  return hf, {"internvl": internvl, "long_vita": long_vita}


@pytest.fixture(scope="module")
def models(checkpoints):
  _, dirs = checkpoints
  return {layout: load_pretrained(d, device="cpu") for layout, d in dirs.items()}


def _hf_logits(hf, ids, pixels):
  with torch.no_grad():
    return hf(input_ids=ids, pixel_values=pixels).logits.float()


@pytest.mark.parametrize("layout", ["internvl", "long_vita"])
@pytest.mark.parametrize("tiles", [0, 1, 3])
def test_fp32_logits(layout, tiles, checkpoints, models):
  hf, _ = checkpoints
  ids, pixels = testing.sample_inputs(2, 24, tiles, seed=tiles)
  ref = _hf_logits(hf, ids, pixels)
  with torch.no_grad():
    out = models[layout](ids, pixels)
  assert out.shape == (2, 24, 300)
  assert (out - ref).abs().max() <= _tol(ref, FP32_TOL)
  if tiles:          # the images change the logits: the features really are used
    assert (_hf_logits(hf, ids, pixels * 0.5) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("tiles", [0, 3])
def test_bf16_logits(tiles, checkpoints):
  hf, dirs = checkpoints
  ids, pixels = testing.sample_inputs(2, 24, tiles, seed=tiles)
  ref = _hf_logits(hf, ids, pixels)
  model = load_pretrained(dirs["long_vita"], dtype=torch.bfloat16, device="cpu")
  assert model.dtype == torch.bfloat16
  with torch.no_grad():
    out = model(ids, pixels).float()
  assert (out - ref).abs().max() <= _tol(ref, BF16_TOL)


def test_vision_features(checkpoints, models):
  hf, _ = checkpoints
  _, pixels = testing.sample_inputs(1, 24, 3)
  with torch.no_grad():
    ref = hf.model.get_image_features(pixel_values=pixels).pooler_output
    vit = hf.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
    for model in models.values():
      assert (model.image_features(pixels) - ref).abs().max() <= 1e-5
      assert (model.vit_features(pixels) - vit).abs().max() <= 1e-5


def test_packing_equals_separate_sequences(checkpoints, models):
  """Two samples packed in one row (positions restart, segment ids differ, padding at the end)
  give the logits transformers gives for each sample alone."""
  hf, _ = checkpoints
  ids, _ = testing.sample_inputs(1, 27, 0, seed=5)           # text only
  _, pixels = testing.sample_inputs(1, 27, 1, seed=5)
  a, b = ids[:, :13].clone(), ids[:, 13:27]
  a[:, 3:7] = testing.IMAGE_TOKEN_ID                         # one tile in the first sample
  packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)
  segments = torch.tensor([[1] * 13 + [2] * 14 + [0] * 3])
  positions = torch.cat([torch.arange(13), torch.arange(14), torch.zeros(3, dtype=torch.long)])
  with torch.no_grad():
    out = models["internvl"](packed, pixels, positions=positions[None], segment_ids=segments)
  ref_a, ref_b = _hf_logits(hf, a, pixels), _hf_logits(hf, b, None)
  assert (out[:, :13] - ref_a).abs().max() <= _tol(ref_a, FP32_TOL)
  assert (out[:, 13:27] - ref_b).abs().max() <= _tol(ref_b, FP32_TOL)
  assert torch.isfinite(out).all()


@pytest.mark.parametrize("tiles", [0, 3])
def test_greedy_generate_matches_transformers(tiles, checkpoints, models):
  hf, _ = checkpoints
  ids, pixels = testing.sample_inputs(2, 16, tiles, seed=10 + tiles)
  images = {} if pixels is None else {"pixel_values": pixels}
  with torch.no_grad():
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                      do_sample=False, **images)[:, ids.shape[1]:]
  out = generate(models["long_vita"], ids, pixels, max_new_tokens=20)
  assert torch.equal(out, ref)


def test_generate_eos_and_sampling(models):
  model = models["internvl"]
  ids, _ = testing.sample_inputs(2, 10, 0, seed=2)
  greedy = generate(model, ids, max_new_tokens=6)
  eos = int(greedy[0, 2])
  out = generate(model, ids, max_new_tokens=6, eos_id=eos)
  assert torch.equal(out[0, :3], greedy[0, :3])                      # EOS kept
  if eos not in greedy[1].tolist():
    assert torch.equal(out[1], greedy[1])
  sampled = [generate(model, ids, max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9,
                      seed=s) for s in (0, 0, 1)]
  assert torch.equal(sampled[0], sampled[1])
  assert not torch.equal(sampled[0], sampled[2])


def test_tied_embeddings(tmp_path):
  hf = testing.make_internvl_checkpoint(str(tmp_path), seed=4, tie_embeddings=True)
  model = load_pretrained(str(tmp_path), device="cpu")
  assert not hasattr(model, "lm_head")
  ids, pixels = testing.sample_inputs(2, 12, 1)
  ref = _hf_logits(hf, ids, pixels)
  with torch.no_grad():
    assert (model(ids, pixels) - ref).abs().max() <= _tol(ref, FP32_TOL)


def test_wrong_number_of_tiles_is_a_clear_error(models):
  ids, pixels = testing.sample_inputs(2, 24, 3)
  with pytest.raises(ValueError, match="visual context tokens"):
    models["internvl"](ids, pixels[:2])


def test_tiled_prefill_for_long_prompts(models, monkeypatch):
  """Above DENSE_MAX_TOKENS the single-process prefill uses the tiled LSE attention."""
  import vita_torch.generate as gen
  model = models["long_vita"]
  ids, pixels = testing.sample_inputs(2, 40, 3, seed=6)
  with torch.no_grad():
    ref = model(ids, pixels)[:, -1]
  monkeypatch.setattr(gen, "DENSE_MAX_TOKENS", 8)
  logits, _ = gen.prefill(model, ids, pixels)
  assert (logits - ref).abs().max() <= _tol(ref, 1e-5)
