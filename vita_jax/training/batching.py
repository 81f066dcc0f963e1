"""From the data pipeline's per-process numpy batches to the global, sharded jax.Arrays the
train step takes: which rows this process feeds (read off the mesh), micro-batch stacking with
context-index offsets, and per-device pieces cut with make_array_from_callback.
"""

from __future__ import annotations

import jax
import numpy as np

from vita_jax.errors import ConfigError

MODEL_KEYS = ("input_ids", "labels", "positions", "segment_ids", "pixel_values",
              "context_index")


class DataShard:
  """Which rows of the global batch this process feeds, read off the mesh.

  Processes that share rows (the `seq` axis spans processes, or data*fsdp is smaller than the
  process count) load the same data; otherwise each loads its own block. `index`/`count`
  select the block for the data pipeline, `row_start` places it in the global batch.
  """

  def __init__(self, mesh, global_rows: int):
    from jax.sharding import NamedSharding

    from vita_jax.parallel.sharding import logical_to_spec
    sharding = NamedSharding(mesh, logical_to_spec(("batch",), mesh, (global_rows,)))
    slices = sharding.addressable_devices_indices_map((global_rows,)).values()
    spans = sorted({(sl[0].start or 0, global_rows if sl[0].stop is None else sl[0].stop)
                    for sl in slices})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
      raise ConfigError(f"this process's devices hold rows {spans} of the batch, which are not "
                        "contiguous; order the mesh so each host's devices are neighbours "
                        "on the data/fsdp axes")
    self.rows = stop - start
    self.count = global_rows // self.rows
    self.index = start // self.rows
    self.row_start = start


def stack_micro_batches(micro: list[dict], tokens_per_tile: int, shard: DataShard
                         ) -> tuple[dict, dict]:
  """Split model inputs from counters and stack micro-batches on a new leading axis.

  Each row block packs its own tiles; in the global pixel array block i's tiles follow blocks
  0..i-1, so this block's context indices are offset by the tiles before it.
  """
  counters = {k: v for k, v in micro[-1].items() if k not in MODEL_KEYS}
  stacked = {k: np.stack([m[k] for m in micro]) for k in MODEL_KEYS if k in micro[0]}
  if "context_index" in stacked and "pixel_values" in stacked:
    offset = shard.index * stacked["pixel_values"].shape[1] * tokens_per_tile
    idx = stacked["context_index"]
    stacked["context_index"] = np.where(idx >= 0, idx + offset, idx).astype(np.int32)
  return stacked, counters


def global_batch(stacked: dict, mesh, shard: DataShard) -> dict:
  """This process's row block -> global jax.Arrays: rows over data/fsdp and the sequence over
  seq; tiles [A, T, H, W, 3] over data/fsdp like the rows, so the vision tower runs spread
  over devices rather than replicated (splitting them over seq too measured larger in XLA's
  memory analysis: the features are gathered for the merge anyway). Each device's piece is
  cut from the local block, so any mesh works, including a `seq` axis that spans processes."""
  from jax.sharding import NamedSharding

  from vita_jax.parallel.sharding import logical_to_spec
  out = {}
  for key, value in stacked.items():
    names = ((None, "batch", None, None, None) if key == "pixel_values"
             else (None, "batch", "length"))
    global_shape = list(value.shape)
    global_shape[1] *= shard.count
    spec = logical_to_spec(names, mesh, global_shape)
    if shard.count > 1 and spec[1] is None:
      raise ConfigError(
          f"{key} has {global_shape[1]} entries on its axis 1, which the data*fsdp devices "
          "cannot split; make data.tiles_per_batch a multiple of data*fsdp "
          f"(mesh {dict(mesh.shape)})")
    start = shard.index * value.shape[1]

    def piece(index, value=value, start=start, total=global_shape[1]):
      lo, hi, _ = index[1].indices(total)     # global rows (or tiles) -> this block's
      return value[(index[0], slice(lo - start, hi - start)) + tuple(index[2:])]

    out[key] = jax.make_array_from_callback(tuple(global_shape), NamedSharding(mesh, spec),
                                            piece)
  return out
