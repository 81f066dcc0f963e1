"""A manifest whose samples each fill one packed row, for tests that compare runs across
process counts.

Every process that feeds its own block of rows packs them from samples i, i+N, i+2N, ... of
the shuffled stream (i its block, N the blocks: `DataShard`), so runs with a different number
of processes see the same global batch only when no two samples share a row (stage 3 packs
without resetting attention: samples sharing a row see each other).
Each sample here is one 56-px image (one tile) and a 50-word answer, 74 tokens, so a 128-token
row holds exactly one; a step's loss, a mean over the global batch, is then the same for any
process count.
"""

from __future__ import annotations

import json
import os

import numpy as np

SEQ_LEN = 128
WORDS = ["red", "blue", "green", "yellow", "orange", "purple", "circle", "square", "triangle"]


def write_manifest(root: str, samples: int = 16) -> str:
  """Write the images and `root/rows.jsonl`; returns the manifest's path."""
  from PIL import Image
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "media"), exist_ok=True)
  path = os.path.join(root, "rows.jsonl")
  with open(path, "w") as f:
    for i in range(samples):
      pixels = rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, "media", f"{i}.png"))
      answer = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 50))
      f.write(json.dumps({"id": f"s{i}", "images": [f"media/{i}.png"], "messages": [
          {"role": "user", "content": "<image>\nList the colours."},
          {"role": "assistant", "content": answer}]}) + "\n")
  return path


def data_overrides(manifest: str, rows: int) -> dict:
  """config.data settings that pack one sample (and its one tile) per row."""
  return {"manifest": manifest, "seq_len": SEQ_LEN, "global_batch_size": rows,
          "tiles_per_batch": rows}


def assert_one_sample_per_row(manifest: str, rows: int, seq_shards: int = 2) -> None:
  """The premise of the comparisons: the first batch holds `rows` samples, one in each row."""
  from configs import stage3
  from vita_jax.data.pipeline import make_train_iterator
  config = stage3.get_config("tiny")
  config.data.update(data_overrides(manifest, rows))
  batch = next(make_train_iterator(config, seq_shards=seq_shards))
  assert batch["samples_read"] == rows and (batch["segment_ids"] > 0).any(axis=1).all()
