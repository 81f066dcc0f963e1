"""The needle evaluation's scoring, table and heatmap, and one cell end to end on a random
tiny model (accuracy is meaningless there; the run must produce answers for every video)."""

import numpy as np
from PIL import Image

from vita_jax.eval import needle


def test_is_correct():
  assert needle.is_correct("a red circle", "a red circle")
  assert needle.is_correct("It shows a red circle.", "a red circle")
  assert not needle.is_correct("a blue circle", "a red circle")
  assert not needle.is_correct("red", "a red circle")


def test_table_and_heatmap(tmp_path):
  acc = np.array([[1.0, 0.5], [0.0, 0.25]])
  table = needle.format_table([16, 64], [0.0, 1.0], acc)
  assert table.splitlines()[1].split() == ["16", "1.00", "0.50"]
  path = tmp_path / "h.png"
  needle.heatmap([16, 64], [0.0, 1.0], acc, str(path))
  img = np.asarray(Image.open(path).convert("RGB"))
  green, red = img[30 + 28, 70 + 10], img[30 + 56 + 28, 70 + 10]   # cells (0,0) and (1,0)
  assert green[1] > green[0] and red[0] > red[1]


def test_one_cell_end_to_end():
  from flax import nnx

  from configs import base
  from vita_jax.data.demo import ensure_demo_data
  from vita_jax.data.tokenizer import load_tokenizer
  from vita_jax.models.vlm import LongVITA
  cfg = base.model_config("tiny")
  cfg.compute_dtype = "float32"
  model = LongVITA(cfg, rngs=nnx.Rngs(0))
  tok = load_tokenizer(ensure_demo_data() + "/tokenizer")
  acc, results = needle.run_cell(model, tok, 6, 0.5, 2, seq_shards=2, max_new_tokens=3)
  assert len(results) == 2 and 0.0 <= acc <= 1.0
  assert all(t.startswith("a ") for _, t in results)
