"""Greedy packing of prepared samples into fixed [batch, seq_len] rows plus a tile budget.

Samples fill row 0, then row 1, ... in arrival order and are never split; a sample that fits
neither the current row nor the next one, or whose tiles exceed what is left of the batch's
`tile_budget`, starts the next batch. Pixel tiles are therefore laid out batch-major, then in
sequence order: the order in which the model meets the visual context tokens.

Batch (numpy): input_ids, labels (shifted: labels[t] = token t+1 when that token is a target of
the same sample, else -100), positions, segment_ids (0 = padding) int32 [B, S]; pixel_values
float32 [tile_budget, H, W, 3] (unused slots zero); scalar counters (Python ints).
"""

from __future__ import annotations

import collections

import grain
import numpy as np
from absl import logging

from vita_jax.errors import ConfigError

IGNORE = -100
MIN_READ_FOR_BAD_CHECK = 100


class DataError(ConfigError):
  """Too much of the data is unusable; the message says how much and why."""


def shifted_labels(ids: np.ndarray, supervised: np.ndarray) -> np.ndarray:
  """int32 [L]: labels[t] = ids[t+1] where token t+1 is a target, else -100 (last is -100)."""
  labels = np.full(len(ids), IGNORE, np.int32)
  labels[:-1] = np.where(supervised[1:], ids[1:], IGNORE)
  return labels


class BatchBuilder:
  """Accumulates samples for one batch; `fits` says whether another one still goes in."""

  def __init__(self, batch_size: int, seq_len: int, tile_budget: int, tile: int, pad_id: int,
               reset_positions: bool):
    self.batch_size, self.seq_len, self.tile_budget = batch_size, seq_len, tile_budget
    self.tile, self.pad_id, self.reset_positions = tile, pad_id, reset_positions
    self.rows = [[] for _ in range(batch_size)]
    self.row, self.row_len, self.tiles = 0, 0, 0

  @property
  def empty(self) -> bool:
    return self.row == 0 and not self.rows[0]

  def _target_row(self, length: int, tiles: int) -> int | None:
    if self.tiles + tiles > self.tile_budget:
      return None
    if self.row_len + length <= self.seq_len:
      return self.row
    if self.row + 1 < self.batch_size and length <= self.seq_len:
      return self.row + 1
    return None

  def fits(self, sample: dict) -> bool:
    return self._target_row(len(sample["input_ids"]), len(sample["pixels"])) is not None

  def add(self, sample: dict) -> None:
    row = self._target_row(len(sample["input_ids"]), len(sample["pixels"]))
    assert row is not None, "add() called for a sample that does not fit"
    if row != self.row:
      self.row, self.row_len = row, 0
    self.rows[row].append(sample)
    self.row_len += len(sample["input_ids"])
    self.tiles += len(sample["pixels"])

  def build(self) -> dict:
    B, S = self.batch_size, self.seq_len
    input_ids = np.full((B, S), self.pad_id, np.int32)
    labels = np.full((B, S), IGNORE, np.int32)
    positions = np.zeros((B, S), np.int32)
    segment_ids = np.zeros((B, S), np.int32)
    pixels = np.zeros((self.tile_budget, self.tile, self.tile, 3), np.float32)
    t = 0
    for b, row in enumerate(self.rows):
      start = 0
      for k, s in enumerate(row, start=1):
        n, end = len(s["input_ids"]), start + len(s["input_ids"])
        input_ids[b, start:end] = s["input_ids"]
        labels[b, start:end] = shifted_labels(s["input_ids"], s["supervised"])
        positions[b, start:end] = np.arange(n) if self.reset_positions else np.arange(start, end)
        # Stages 3-4 attend across packed samples (docs/design.md#stages): one segment per row.
        segment_ids[b, start:end] = k if self.reset_positions else 1
        pixels[t:t + len(s["pixels"])] = s["pixels"]
        t += len(s["pixels"])
        start = end
    samples = [s for row in self.rows for s in row]
    return {
        "input_ids": input_ids, "labels": labels, "positions": positions,
        "segment_ids": segment_ids, "pixel_values": pixels,
        "num_tiles": t, "num_samples": len(samples),
        "num_tokens": int(sum(len(s["input_ids"]) for s in samples)),
        "num_target_tokens": int((labels != IGNORE).sum()),
    }


class PackIterDataset(grain.IterDataset):
  """Packs a stream of prepared samples / skip records into batches (see module docstring)."""

  def __init__(self, parent: grain.IterDataset, *, max_bad_fraction: float = 1.0,
               min_read_for_bad_check: int = MIN_READ_FOR_BAD_CHECK, **builder_kwargs):
    super().__init__(parent)
    self._builder_kwargs = builder_kwargs
    self._max_bad_fraction = max_bad_fraction
    self._min_read = min_read_for_bad_check

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self._builder_kwargs, self._max_bad_fraction,
                         self._min_read)


class _PackIterator(grain.DatasetIterator):
  """State = the parent's state *before* the sample carried over to the next batch (if any),
  so restoring re-reads that sample; counters count samples when packed, skips when read."""

  def __init__(self, parent, builder_kwargs, max_bad_fraction, min_read):
    super().__init__(parent)
    self._kwargs, self._max_bad, self._min_read = builder_kwargs, max_bad_fraction, min_read
    self._carry, self._carry_state = None, None
    self._counts = collections.Counter()
    self._warned = set()       # manifest lines already reported: one warning each, not per pass

  def _count_skip(self, record: dict) -> None:
    reason = record["skip"]
    self._counts["samples_read"] += 1
    self._counts[f"skipped/{reason}"] += 1
    self._counts["skipped"] += 1
    if record["where"] not in self._warned:
      self._warned.add(record["where"])
      logging.warning("skipping %s (%s): %s", record["where"], reason, record["message"])
    read, bad = self._counts["samples_read"], self._counts["skipped"]
    if read >= self._min_read and bad > self._max_bad * read:
      reasons = ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in sorted(self._counts.items())
                          if k.startswith("skipped/"))
      raise DataError(
          f"{bad} of {read} samples were unusable ({reasons}), above "
          f"data.max_bad_fraction={self._max_bad}; check the data with `python -m "
          "vita_jax.data.check` or raise --config.data.max_bad_fraction")

  def __next__(self) -> dict:
    builder = BatchBuilder(**self._kwargs)
    while True:
      if self._carry is not None:
        sample, state_before = self._carry, self._carry_state
        self._carry = self._carry_state = None
      else:
        state_before = self._parent.get_state()
        try:
          sample = next(self._parent)
        except StopIteration:
          if builder.empty:
            raise
          break
      if "skip" in sample:
        self._count_skip(sample)
        continue
      if builder.fits(sample):
        builder.add(sample)
        self._counts["samples_read"] += 1
        self._counts[f"samples/{sample['source']}"] += 1
        continue
      if builder.empty:  # more tiles than a whole batch holds
        self._count_skip({"skip": "too_many_tiles", "where": sample.get("where", "?"),
                          "message": f"{len(sample['pixels'])} tiles > tiles_per_batch "
                          f"{builder.tile_budget}"})
        continue
      self._carry, self._carry_state = sample, state_before
      break
    batch = builder.build()
    batch.update({k: int(v) for k, v in self._counts.items()})
    return batch

  def get_state(self) -> dict:
    parent = self._carry_state if self._carry is not None else self._parent.get_state()
    return {"parent": parent, "counts": dict(self._counts)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._carry = self._carry_state = None
    self._counts = collections.Counter({k: int(v) for k, v in state["counts"].items()})
