"""Greedy generation: vita_jax.generate vs transformers' `generate()` on a tiny random
InternVLForConditionalGeneration (fp32), 20 new tokens, with and without an image, on one
device and with the prompt sharded over 4 (context-parallel prefill, sharded KV cache)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import vita_jax  # noqa: E402
from vita_jax import generate as gen  # noqa: E402
from vita_torch import testing  # noqa: E402

NEW = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("internvl"))
  hf = testing.make_internvl_checkpoint(path, seed=3)
  hf.generation_config.eos_token_id = None       # always 20 tokens on both sides
  hf.generation_config.pad_token_id = 0
  return hf, vita_jax.load_pretrained(path, dtype="float32")


@pytest.mark.parametrize("tiles", [0, 2])
def test_greedy_matches_transformers(models, tiles):
  hf, model = models
  ids, pixels = testing.sample_inputs(1, 29, tiles, seed=tiles)
  visual = {} if pixels is None else {"pixel_values": pixels}
  with torch.no_grad():
    out = hf.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, **visual)
    want_logits = hf(input_ids=ids, **visual).logits[:, -1].numpy()
  want = out[:, ids.shape[1]:].numpy()
  assert want.shape == (1, NEW)
  jax_pixels = None if pixels is None else pixels.permute(0, 2, 3, 1).numpy()
  for shards in (1, 4):
    logits, _, _ = gen.prefill(model, ids.numpy(), jax_pixels, seq_shards=shards)
    delta = float(np.max(np.abs(np.asarray(logits) - want_logits)))
    assert delta <= 1e-4 * max(1.0, float(np.max(np.abs(want_logits)))), delta
    got = gen.generate(model, ids.numpy(), jax_pixels, max_new_tokens=NEW, seq_shards=shards)
    np.testing.assert_array_equal(got, want)
