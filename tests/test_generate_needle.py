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


def test_random_guess_baseline_and_show_answers():
  """Chance is 1/24 for 6 colours x 4 shapes; random answers scored by is_correct land near it
  (2,400 guesses: 3 standard errors ~ 0.012), and a guesser that always names the truth scores
  1; the answers listing marks each answer right or wrong."""
  from vita_jax.data.demo import COLOURS, SHAPES
  assert needle.chance_accuracy() == 1 / (len(COLOURS) * len(SHAPES)) == 1 / 24
  truths = [t for _, t in needle.cell_videos(8, 0.5, 0, 24)]
  measured = needle.random_guess_accuracy(truths, guesses=100)
  assert abs(measured - 1 / 24) < 0.015, measured
  text = needle.format_answers([8], [0.0, 1.0], [[[("a red circle", "a red circle")],
                                                  [("blue", "a blue cross")]]])
  lines = text.splitlines()
  assert lines[1].endswith("'a red circle' [a red circle] ok")
  assert lines[2].endswith("'blue' [a blue cross] x")
  table = needle.format_baseline([8, 16], np.array([[1.0, 0.5], [0.0, 0.0]]), [0.05, 0.03])
  assert table.splitlines()[1].split() == ["8", "0.750", "0.042", "0.050"]


def test_needle_seeds_train_and_eval_disjoint(tmp_path):
  """Every needle video in the training data (stage-2 corpus and stage-3 curriculum, seeds read
  back from the manifests) has a seed below every seed the evaluation uses, and the curriculum
  is written shortest first."""
  import json
  import os

  from vita_jax.data import demo
  curriculum = demo.write_needle_curriculum(str(tmp_path / "needle"), {4: 3, 2: 3})
  with open(os.path.join(curriculum, "train.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  lengths = [len(os.listdir(os.path.join(curriculum, r["videos"][0]))) for r in rows]
  assert lengths == [2, 2, 2, 4, 4, 4]
  train_seeds = {int(r["id"].removeprefix("needle")) for r in rows}
  demo._write_split(str(tmp_path), "demo", 0, dict(image=0, video=30, mp4=2, text=0), 8)
  with open(tmp_path / "demo" / "train.jsonl") as f:
    stage2 = [json.loads(line)["id"] for line in f]
  stage2_seeds = {int(i.split("-needle")[1]) for i in stage2 if "-needle" in i}
  assert len(stage2_seeds) >= 5                   # the corpus does hold needle videos
  train_seeds |= stage2_seeds
  eval_seeds = {demo.eval_needle_seed(n, j, k) for n in (1, 8, 128, 4096) for j in range(5)
                for k in range(16)}
  assert len(eval_seeds) == 4 * 5 * 16            # unique per cell and sample
  assert max(train_seeds) < min(eval_seeds)
  assert not train_seeds & eval_seeds
