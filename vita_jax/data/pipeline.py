"""The training input pipeline: manifests -> prepared samples -> packed, sharded batches.

    it = make_train_iterator(config, seq_shards=mesh.shape["seq"],
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)          # dict of numpy arrays + counters, see vita_jax.data.packing
    state = it.get_state()    # JSON-able; it.set_state(state) resumes with the same batches

grain does the work: index sampling over line-indexed JSONL sources, a seeded shuffle per
source, repeat, weighted mixing, a per-process slice (each process reads only its rows), the
per-sample preparation (threads, or worker processes with data.num_workers > 0), packing, the
zigzag layout for seq shards > 1, and prefetch.
"""

from __future__ import annotations

import functools
import os

import grain
import numpy as np

from vita_jax.data import demo
from vita_jax.data import image as image_lib
from vita_jax.data import video as video_lib
from vita_jax.data.conversation import (
  SampleError,
  encode_conversation,
  tiles_of_grid,
  truncate_at_turn,
)
from vita_jax.data.manifest import JsonlSource, parse_mixture, parse_sample, resolve_sources
from vita_jax.data.packing import PackIterDataset
from vita_jax.data.tokenizer import check_token_ids, load_tokenizer
from vita_jax.errors import ConfigError
from vita_jax.spec.tokens import context_index, context_token_ids, tokens_per_tile

SEQUENCE_KEYS = ("input_ids", "labels", "positions", "segment_ids", "context_index")


class PrepareSample:
  """Manifest record -> {"input_ids", "supervised", "pixels", "source", "where"}, or a skip
  record {"skip": reason, "where": "file:line", "message", "source"} for unusable samples."""

  def __init__(self, *, tokenizer: str, tile: int, max_tiles: int, tokens_per_tile: int,
               max_frames: int, fps: float, seq_len: int, truncate: bool,
               video_sampling: str = "release"):
    self.tokenizer_path, self.tile, self.max_tiles = tokenizer, tile, max_tiles
    self.tpt, self.max_frames, self.fps = tokens_per_tile, max_frames, fps
    self.video_sampling = video_sampling
    self.seq_len, self.truncate = seq_len, truncate

  def __call__(self, record: dict) -> dict:
    where = f"{record['file']}:{record['line']}"
    try:
      out = self.prepare(record)
    except SampleError as e:
      return {"skip": e.reason, "where": where, "message": str(e), "source": record["source"]}
    out["where"] = where
    return out

  def prepare(self, record: dict) -> dict:
    tok = load_tokenizer(self.tokenizer_path)
    sample = parse_sample(record["text"])
    base = os.path.dirname(record["file"])
    images = [self._image(os.path.join(base, p)) for p in sample["images"]]
    videos = [self._video(os.path.join(base, p)) for p in sample["videos"]]
    grids = [image_lib.grid_of(im.size, self.tile, self.max_tiles) for im in images]
    enc = encode_conversation(sample["messages"], tok, self.tpt, grids, [len(v) for v in videos])
    if len(enc.ids) > self.seq_len:
      short = truncate_at_turn(enc, self.seq_len) if self.truncate else None
      if short is None:
        raise SampleError("too_long", f"{len(enc.ids)} tokens > data.seq_len {self.seq_len}"
                          + ("" if self.truncate else " (or set data.truncate_long_samples)"))
      enc = short
    pixels = []
    for kind, i in enc.visual_order:
      if kind == "image":
        tiles = image_lib.dynamic_tiles(images[i], self.tile, self.max_tiles)
        assert len(tiles) == tiles_of_grid(grids[i])
        pixels.append(tiles)
      else:
        pixels.append(videos[i])
    pixels = (np.concatenate(pixels) if pixels
              else np.zeros((0, self.tile, self.tile, 3), np.float32))
    return {"input_ids": enc.ids, "supervised": enc.supervised, "pixels": pixels,
            "source": record["source"]}

  def _image(self, path: str):
    if not os.path.exists(path):
      raise SampleError("missing_file", f"image {path!r} does not exist")
    try:
      return image_lib.load_image(path)
    except Exception as e:  # noqa: BLE001 - pillow raises many types for bad files
      raise SampleError("corrupt_image", f"image {path!r} cannot be decoded: {e}") from e

  def _video(self, path: str) -> np.ndarray:
    if not os.path.exists(path):
      raise SampleError("missing_file", f"video {path!r} does not exist")
    try:
      return video_lib.load_video(path, self.tile, self.max_frames, self.fps,
                                  sampling=self.video_sampling)
    except Exception as e:  # noqa: BLE001 - PyAV / pillow errors
      raise SampleError("corrupt_video", f"video {path!r} cannot be decoded: {e}") from e


def default_tile_budget(seq_len: int, rows: int, tpt: int) -> int:
  """Tiles a batch can need at most: every row filled with single-tile images."""
  return rows * max(1, seq_len // (tpt + 2))


def prepare_data_files(data_cfg) -> None:
  """Generate the demo corpus and tokenizer on first use when the config points at them."""
  root = os.path.normpath(data_cfg.data_root)
  demo_root = os.path.normpath(demo.DEMO_ROOT)
  uses_demo = (root == demo_root and not data_cfg.manifest) or (
      os.path.normpath(data_cfg.tokenizer or "x") == os.path.join(demo_root, "tokenizer"))
  if uses_demo:
    demo.ensure_demo_data(demo_root)
  if root == demo_root and not data_cfg.manifest and demo.NEEDLE_DIR in _mixture_names(data_cfg):
    demo.ensure_needle_curriculum(demo_root)


def _mixture_names(data_cfg) -> set[str]:
  return {name for name, _ in parse_mixture(data_cfg.mixture)}


def make_prepare(config) -> PrepareSample:
  data = config.data
  return PrepareSample(
      tokenizer=data.tokenizer, tile=config.model.vision.image_size, max_tiles=data.max_tiles,
      tokens_per_tile=tokens_per_tile(config.model), max_frames=data.max_frames,
      fps=data.video_fps, seq_len=data.seq_len, truncate=data.truncate_long_samples,
      video_sampling=data.get("video_sampling", "release"))


def add_context_index(batch: dict, context_ids: tuple[int, ...]) -> dict:
  """`batch` with "context_index" (see vita_jax.spec.tokens.context_index) added."""
  return {**batch, "context_index": context_index(batch["input_ids"], context_ids)}


def _zigzag(batch: dict, num_shards: int) -> dict:
  from vita_jax.spec.zigzag import zigzag_batch
  seq = zigzag_batch({k: batch[k] for k in SEQUENCE_KEYS}, num_shards)
  return {**batch, **seq}


def make_dataset(config, *, seq_shards: int = 1, process_index: int = 0, process_count: int = 1,
                 split: str = "train") -> grain.IterDataset:
  """The grain IterDataset of packed batches for this process (see module docstring)."""
  data = config.data
  if data.global_batch_size % process_count:
    raise ConfigError(f"data.global_batch_size={data.global_batch_size} does not divide over "
                      f"{process_count} processes; use a multiple of {process_count}")
  prepare_data_files(data)
  tok = load_tokenizer(data.tokenizer)
  check_token_ids(tok, config.model.tokens)
  rows = data.global_batch_size // process_count
  tpt = tokens_per_tile(config.model)
  train = split == "train"
  sources = resolve_sources(data, split)
  ordered = {n.strip() for n in data.get("ordered_sources", "").split(",") if n.strip()}
  unknown = ordered - {s.name for s in sources}
  if train and unknown:
    raise ConfigError(f"data.ordered_sources names {sorted(unknown)}, which the mixture does "
                      f"not have ({', '.join(s.name for s in sources)}); fix one of the two")
  datasets = []
  for i, src in enumerate(sources):
    ds = grain.MapDataset.source(JsonlSource(src.name, src.files))
    if len(ds) == 0:
      raise ConfigError(f"dataset {src.name!r} ({', '.join(src.files)}) has no samples")
    if train:
      # An ordered source is read in file order (a curriculum written shortest first).
      if src.name not in ordered:
        ds = ds.shuffle(seed=data.seed + 1000 * i)
      ds = ds.repeat()
    datasets.append(ds)
  if len(datasets) > 1:
    ds = grain.MapDataset.mix(datasets, [s.weight for s in sources])
  else:
    ds = datasets[0]
  ds = ds[process_index::process_count].map(make_prepare(config))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=32))
  if data.num_workers > 0:
    from absl import flags  # grain's workers read absl flags; outside app.run none are parsed
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  ds = PackIterDataset(
      ds, batch_size=rows, seq_len=data.seq_len,
      tile_budget=data.tiles_per_batch or default_tile_budget(data.seq_len, rows, tpt),
      tile=config.model.vision.image_size, pad_id=tok.pad_id,
      reset_positions=data.reset_positions,
      max_bad_fraction=data.max_bad_fraction if train else 1.0)
  ds = ds.map(functools.partial(add_context_index,
                                context_ids=context_token_ids(config.model.tokens)))
  if seq_shards > 1:
    ds = ds.map(functools.partial(_zigzag, num_shards=seq_shards))
  if data.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data.prefetch)
  return ds


def make_train_iterator(config, *, seq_shards: int = 1, process_index: int = 0,
                        process_count: int = 1, split: str = "train") -> grain.DatasetIterator:
  """A checkpointable iterator of this process's batches (`get_state` / `set_state`)."""
  return iter(make_dataset(config, seq_shards=seq_shards, process_index=process_index,
                           process_count=process_count, split=split))
