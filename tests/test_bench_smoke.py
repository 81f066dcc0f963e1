"""`make bench` harness: one figure at a trivial size writes valid JSON and the markdown table;
the load-balance counter agrees with a naive count of the causal mask."""

import json

import numpy as np

from benchmarks import run
from benchmarks.fig_ring import shard_work
from vita_jax.spec.zigzag import zigzag_permutation


def test_lm_head_figure_writes_json_and_table(tmp_path):
  assert run.main(["--smoke", "--only", "lm_head", "--repeats", "1", "--out", str(tmp_path),
                   "--name", "smoke"]) == 0
  result = json.loads((tmp_path / "smoke.json").read_text())
  assert result["mode"] == "smoke" and result["machine"]["cpu_count"] >= 1
  assert len(result["load_average_start"]) == 3 and len(result["load_average_end"]) == 3
  rows = result["figures"]["lm_head"]["rows"]
  assert len(rows) == 2
  for row in rows:
    assert row["ours"] > 0 and row["baseline"] > 0 and row["ratio"] > 0
    assert row["passed"] in (True, False)
  memory = rows[0]
  assert memory["ours"] < memory["baseline"]      # chunked holds fewer bytes than full logits
  table = (tmp_path / "smoke.md").read_text()
  assert "| 4 LM head |" in table and table.count("\n|") >= 4


def _naive_work(order, shards, chunk):
  """Per shard: unmasked causal pairs and visible chunk x chunk tiles, by brute force."""
  pos = np.asarray(order)
  blocks = pos.reshape(shards, -1)
  pairs = [int((b[:, None] >= pos[None, :]).sum()) for b in blocks]
  tiles = []
  for b in blocks:
    count = 0
    for qt in b.reshape(-1, chunk):
      for kt in pos.reshape(-1, chunk):
        count += bool((qt[:, None] >= kt[None, :]).any())
    tiles.append(count)
  return pairs, tiles


def test_shard_work_matches_naive_mask_count():
  s, shards, chunk = 64, 4, 4
  for order in (np.arange(s), zigzag_permutation(s, shards)):
    pairs, tiles = shard_work(order, shards, chunk, chunk)
    want_pairs, want_tiles = _naive_work(order, shards, chunk)
    assert pairs.tolist() == want_pairs and tiles.tolist() == want_tiles
  zz_pairs, _ = shard_work(zigzag_permutation(s, shards), shards, chunk, chunk)
  contiguous, _ = shard_work(np.arange(s), shards, chunk, chunk)
  assert zz_pairs.max() == zz_pairs.min() and contiguous.max() / contiguous.min() > 3
