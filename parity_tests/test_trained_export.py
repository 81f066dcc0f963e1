"""A checkpoint trained by `vita_jax.train`, exported with `vita_jax.convert WORKDIR DIR`, gives
the same logits in `vita_torch` as the JAX model restored from the workdir
(docs/design.md#precision, fp32)."""

import numpy as np
import pytest
import torch

from configs import stage2
from vita_jax.checkpoints.workdir import load_model_from_workdir
from vita_jax.convert import convert
from vita_jax.train import train

vita_torch = pytest.importorskip("vita_torch")


def test_trained_workdir_exports_to_vita_torch_with_equal_logits(tmp_path):
  config = stage2.get_config("tiny")
  config.mesh.update(data=1)
  config.train.update(steps=2, log_every=1, checkpoint_every=2, eval_every=0,
                      peak_tflops_per_device=1.0)
  config.data.update(seq_len=128, global_batch_size=1, tiles_per_batch=8)
  import jax
  train(config, str(tmp_path / "run"), devices=jax.devices()[:1])

  out = str(tmp_path / "export")
  assert convert(str(tmp_path / "run"), out, layout="long_vita") == "long_vita"
  jax_model, cfg = load_model_from_workdir(str(tmp_path / "run"), dtype="float32")
  torch_model = vita_torch.load_pretrained(out, dtype=torch.float32, device="cpu")

  rng = np.random.default_rng(0)
  tpt, tiles = 4, 2
  ids = rng.integers(20, cfg.model.llm.vocab_size, (1, 40)).astype(np.int32)
  ids[0, 3:3 + tiles * tpt] = cfg.model.tokens.img_context_id
  side = cfg.model.vision.image_size
  pixels = rng.standard_normal((tiles, side, side, 3)).astype(np.float32)

  want = np.asarray(jax_model(ids, pixel_values=pixels))
  with torch.no_grad():
    got = torch_model(torch.from_numpy(ids.astype(np.int64)),
                      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
  got = got.float().numpy()
  bound = 1e-4 * max(1.0, np.abs(want).max())
  assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)
  # The export is of the trained weights, not a fresh init: two steps moved them.
  fresh = stage2.get_config("tiny")
  from vita_jax.train import build_model
  assert np.abs(np.asarray(build_model(fresh, None)(ids, pixel_values=pixels)) - want).max() > 1e-4
