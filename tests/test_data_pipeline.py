"""Packing, label shift, bad-data accounting, the inspect report and resumable iterators."""

import json
import logging
import os
import shutil

import grain
import numpy as np
import pytest

from configs import stage2, stage3
from vita_jax.data import demo, pipeline
from vita_jax.data.check import format_report, inspect_data, render
from vita_jax.data.packing import IGNORE, DataError, PackIterDataset
from vita_jax.data.tokenizer import load_tokenizer
from vita_jax.errors import ConfigError


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
  return demo.ensure_demo_data(str(tmp_path_factory.getbasetemp() / "demo_data"))


def tiny(demo_root, stage=stage2, **data):
  config = stage.get_config("tiny")
  config.data.data_root = demo_root
  config.data.tokenizer = os.path.join(demo_root, "tokenizer")
  config.data.update(data)
  return config


def synthetic(k, length, tiles, rng):
  """Sample k: ids k*1000 + j (so every token names its sample), pixels filled with k."""
  return {"input_ids": (k * 1000 + np.arange(length)).astype(np.int32),
          "supervised": rng.random(length) < 0.5,
          "pixels": np.full((tiles, 2, 2, 3), k, np.float32), "source": "syn", "where": f"s:{k}"}


@pytest.mark.parametrize("reset_positions", [True, False])
def test_packing_never_splits_and_keeps_order(reset_positions):
  rng = np.random.default_rng(0)
  samples = [synthetic(k, int(rng.integers(1, 40)), int(rng.integers(0, 4)), rng)
             for k in range(1, 120)]
  ds = PackIterDataset(grain.MapDataset.source(samples).to_iter_dataset(), batch_size=3,
                       seq_len=48, tile_budget=10, tile=2, pad_id=0,
                       reset_positions=reset_positions)
  seen, tiles_seen = [], []
  for batch in ds:
    ids, lab, pos, seg = (batch["input_ids"], batch["labels"], batch["positions"],
                          batch["segment_ids"])
    assert ids.shape == (3, 48) and batch["pixel_values"].shape == (10, 2, 2, 3)
    assert batch["num_tiles"] <= 10
    for b in range(3):
      real = seg[b] > 0
      n = int(real.sum())
      assert real[:n].all() and not real[n:].any()      # padding only at the end
      if n == 0:
        continue
      sample_of = ids[b, :n] // 1000
      starts = np.flatnonzero(np.r_[True, sample_of[1:] != sample_of[:-1]])
      for s, e in zip(starts, np.r_[starts[1:], n]):
        k = sample_of[s]
        np.testing.assert_array_equal(ids[b, s:e], samples[k - 1]["input_ids"])  # whole
        want_pos = np.arange(e - s) if reset_positions else np.arange(s, e)
        np.testing.assert_array_equal(pos[b, s:e], want_pos)
        seen.append(k)
      # Naive label reference: next token if it belongs to the same sample and is a target.
      for t in range(48):
        want = IGNORE
        if t + 1 < n and sample_of[t] == sample_of[t + 1]:
          k, j = sample_of[t + 1], ids[b, t + 1] % 1000
          if samples[k - 1]["supervised"][j]:
            want = ids[b, t + 1]
        assert lab[b, t] == want, (b, t)
      if reset_positions:
        assert len(np.unique(seg[b, :n])) == len(starts)
      else:
        assert (seg[b, :n] == 1).all()                   # attend across samples (stages 3-4)
    used = batch["num_tiles"]
    tiles_seen += list(batch["pixel_values"][:used, 0, 0, 0].astype(int))
    assert not batch["pixel_values"][used:].any()
  assert seen == list(range(1, 120))                     # nothing lost, nothing reordered
  assert tiles_seen == [k for k in range(1, 120) for _ in range(len(samples[k - 1]["pixels"]))]


def _bad_manifest(tmp_path, demo_root, extra_long=True):
  """8 good samples plus one missing image, one corrupt image and one over-long sample."""
  media = tmp_path / "media"
  os.makedirs(media)
  src = os.path.join(demo_root, "demo", "media")
  good = sorted(f for f in os.listdir(src) if f.endswith(".png"))[:6]
  for f in good:
    shutil.copy(os.path.join(src, f), media / f)
  frames = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))[0]
  shutil.copytree(os.path.join(src, frames), media / "clip")
  (media / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  qa = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
  lines = [{"id": f"g{i}", "messages": qa("<image>\nWhat colour is the shape?", "red"),
            "images": [f"media/{f}"]} for i, f in enumerate(good)]
  lines.append({"id": "v", "messages": qa("<video>\nWhich way?", "left"), "videos": ["media/clip"]})
  lines.append({"id": "t", "messages": qa("What is 2 plus 2?", "4")})
  lines.insert(3, {"id": "missing", "messages": qa("<image>\nHi", "x"), "images": ["media/no.png"]})
  lines.insert(5, {"id": "corrupt", "messages": qa("<image>\nHi", "x"),
                   "images": ["media/broken.png"]})
  if extra_long:
    lines.insert(7, {"id": "long", "messages": qa("word " * 3000, "ok")})
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  return str(path)


def test_inspect_reports_exactly_the_three_bad_samples(tmp_path, demo_root):
  manifest = _bad_manifest(tmp_path, demo_root)
  config = tiny(demo_root, manifest=manifest)
  report = inspect_data(config)
  counts = report["sources"]["bad"]["counts"]
  assert counts == {"read": 11, "ok": 8, "skipped/missing_file": 1,
                    "skipped/corrupt_image": 1, "skipped/too_long": 1}
  assert [(w.rsplit(":", 1)[1], r) for w, r, _ in report["skips"]] == [
      ("4", "missing_file"), ("6", "corrupt_image"), ("8", "too_long")]
  assert report["packing"]["samples"] == 8
  text = format_report(report, load_tokenizer(config.data.tokenizer))
  assert "11 read, 8 usable, 3 skipped (corrupt_image: 1, missing_file: 1, too_long: 1)" in text
  tok = load_tokenizer(config.data.tokenizer)
  example = render(tok, report["example"]["input_ids"], report["example"]["supervised"])
  assert "⟦red<|im_end|>\n⟧" in example and "<IMG_CONTEXT>×4" in example


def test_pipeline_counts_every_skip(tmp_path, demo_root, caplog):
  manifest = _bad_manifest(tmp_path, demo_root)
  with open(manifest, "a") as f:
    f.write('{"id": "oops", "messages": [\n')                          # line 12
    f.write(json.dumps({"id": "v2", "messages": [
        {"role": "user", "content": "<video>"}, {"role": "assistant", "content": "x"}],
        "videos": ["media/broken.mp4"]}) + "\n")                        # line 13
  (tmp_path / "media" / "broken.mp4").write_bytes(b"not a video at all")
  config = tiny(demo_root, eval_manifest=manifest, global_batch_size=2, seq_len=256)
  with caplog.at_level(logging.WARNING):
    batches = list(pipeline.make_train_iterator(config, split="eval"))
  last = batches[-1]
  skips = {k: v for k, v in last.items() if k.startswith("skipped/")}
  assert skips == {"skipped/missing_file": 1, "skipped/corrupt_image": 1,
                   "skipped/too_long": 1, "skipped/malformed_json": 1,
                   "skipped/corrupt_video": 1}
  assert last["samples_read"] == 13 and sum(b["num_samples"] for b in batches) == 8
  assert f"{manifest}:12 (malformed_json)" in caplog.text
  # Tiles: 6 images (3 with a thumbnail + grid) and one 8-frame video, all in the batches.
  assert sum(b["num_tiles"] for b in batches) > 8


def test_a_bad_line_is_warned_about_once_however_many_passes(tmp_path, demo_root, caplog):
  path = tmp_path / "one_bad.jsonl"
  good = json.dumps({"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                                  {"role": "assistant", "content": "2"}]})
  path.write_text("\n".join([good] * 3 + ["{broken"]) + "\n")
  config = tiny(demo_root, manifest=str(path), max_bad_fraction=0.5, global_batch_size=1,
                seq_len=128)
  it = pipeline.make_train_iterator(config)
  with caplog.at_level(logging.WARNING):
    batches = [next(it) for _ in range(12)]
  assert batches[-1]["skipped/malformed_json"] >= 3          # the line was read on 3+ passes
  assert caplog.text.count(f"{path}:4 (malformed_json)") == 1


def test_too_much_bad_data_stops_the_run(tmp_path, demo_root):
  path = tmp_path / "mostly_ok.jsonl"
  good = json.dumps({"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                                  {"role": "assistant", "content": "2"}]})
  path.write_text("\n".join([good] * 90 + ["{broken"] * 10) + "\n")
  config = tiny(demo_root, manifest=str(path), max_bad_fraction=0.05, global_batch_size=1,
                seq_len=128)
  it = pipeline.make_train_iterator(config)
  with pytest.raises(DataError, match="above data.max_bad_fraction=0.05"):
    for _ in range(200):
      next(it)


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("stage", [stage2, stage3])
def test_iterator_state_restores_the_same_batches(demo_root, stage):
  config = tiny(demo_root, stage, global_batch_size=2, seq_len=256)
  it = pipeline.make_train_iterator(config)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))          # must survive a JSON checkpoint
  expected = [next(it) for _ in range(3)]
  fresh = pipeline.make_train_iterator(config)
  fresh.set_state(state)
  for want in expected:
    _equal(next(fresh), want)


def test_processes_read_disjoint_rows(demo_root):
  config = tiny(demo_root, global_batch_size=4, seq_len=256)
  a = next(pipeline.make_train_iterator(config, process_index=0, process_count=2))
  b = next(pipeline.make_train_iterator(config, process_index=1, process_count=2))
  assert a["input_ids"].shape == (2, 256)
  assert not np.array_equal(a["input_ids"], b["input_ids"])


def test_zigzag_applied_for_seq_shards(demo_root):
  zigzag = pytest.importorskip("vita_jax.spec.zigzag")
  config = tiny(demo_root, global_batch_size=2, seq_len=256)
  plain = next(pipeline.make_train_iterator(config))
  zz = next(pipeline.make_train_iterator(config, seq_shards=2))
  perm = zigzag.zigzag_permutation(256, 2)
  for key in pipeline.SEQUENCE_KEYS:
    np.testing.assert_array_equal(zz[key], plain[key][:, perm])
  np.testing.assert_array_equal(zz["pixel_values"], plain["pixel_values"])


def test_missing_dataset_is_a_clear_error(demo_root):
  config = tiny(demo_root, mixture="demo=0.5,LLaVA-ReCap=0.5")
  with pytest.raises(ConfigError, match=r"LLaVA-ReCap not found .* found: demo"):
    pipeline.make_train_iterator(config)


def test_demo_batch_is_learnable(demo_root):
  """The tiny demo config packs well and supervises answers, not prompts or pixels."""
  config = tiny(demo_root)
  batch = next(pipeline.make_train_iterator(config))
  assert batch["input_ids"].shape == (4, 1024)
  assert (batch["segment_ids"] > 0).mean() > 0.9                  # packing efficiency
  tok = load_tokenizer(config.data.tokenizer)
  targets = batch["labels"][batch["labels"] != IGNORE]
  assert 0 < len(targets) < 0.2 * batch["input_ids"].size
  context = [tok.ids[t] for t in ("<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>")]
  assert not np.isin(targets, context).any()
  n_ctx = np.isin(batch["input_ids"], context).sum()
  assert n_ctx == 4 * batch["num_tiles"]                           # one tile per 4 tokens


def test_sample_over_the_tile_budget_is_counted():
  rng = np.random.default_rng(1)
  samples = [synthetic(1, 5, 1, rng), synthetic(2, 5, 4, rng), synthetic(3, 5, 1, rng)]
  ds = PackIterDataset(grain.MapDataset.source(samples).to_iter_dataset(), batch_size=1,
                       seq_len=32, tile_budget=3, tile=2, pad_id=0, reset_positions=True)
  batches = list(ds)
  assert batches[-1]["skipped/too_many_tiles"] == 1 and batches[-1]["samples_read"] == 3
  assert sum(b["num_samples"] for b in batches) == 2


def test_truncate_long_sample_at_turn_boundary(demo_root):
  config = tiny(demo_root, seq_len=64, truncate_long_samples=True)
  turns = []
  for k in range(6):
    turns += [{"role": "user", "content": f"What is {k} plus {k}?"},
              {"role": "assistant", "content": str(2 * k)}]
  record = {"text": json.dumps({"messages": turns}), "file": "x.jsonl", "line": 1,
            "source": "x"}
  out = pipeline.make_prepare(config)(record)
  tok = load_tokenizer(config.data.tokenizer)
  assert "skip" not in out and len(out["input_ids"]) <= 64
  text = tok.decode(out["input_ids"])
  assert text.endswith("<|im_end|>\n") and text.count("<|im_start|>assistant") >= 1
  assert text.count("<|im_start|>") % 2 == 0                 # whole user/assistant pairs
  config.data.truncate_long_samples = False
  assert pipeline.make_prepare(config)(record)["skip"] == "too_long"


def test_ordered_source_is_read_in_file_order(demo_root, tmp_path):
  """A source named in data.ordered_sources (the needle curriculum) comes in file order, while
  an unordered one is shuffled; a name the mixture lacks is refused with the fix."""
  import re
  path = tmp_path / "curriculum.jsonl"
  path.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": f"What is {k} plus 0?"},
      {"role": "assistant", "content": str(k)}]}) + "\n" for k in range(12)))
  tok = load_tokenizer(os.path.join(demo_root, "tokenizer"))

  def order(ordered):
    config = tiny(demo_root, manifest=str(path), ordered_sources=ordered, global_batch_size=1,
                  seq_len=512, prefetch=0)
    batch = next(pipeline.make_train_iterator(config))
    text = tok.decode([int(t) for t in batch["input_ids"][0] if t != tok.pad_id])
    return [int(k) for k in re.findall(r"What is (\d+) plus", text)][:12]  # one epoch

  assert order("curriculum") == list(range(12))
  assert sorted(order("")) == list(range(12)) and order("") != list(range(12))
  with pytest.raises(ConfigError, match="ordered_sources names \\['needle'\\]"):
    order("needle")
