"""Training checkpoints with orbax: params, optimizer state, step, RNG and data-iterator state.

Saves are asynchronous, the last `keep` are kept, and restoring walks back from the newest:
orbax never exposes a half-written (uncommitted) step, and a committed one that fails to load
is reported and skipped in favour of the one before. The trainer restores the whole state onto
its mesh (`restore`); readers of a workdir take only the weights, straight onto their own
shardings (`restore_sharded`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store


def _encode_data_state(state: Any) -> dict:
  try:
    json.dumps(state)
    return {"json": state}
  except TypeError:  # bytes inside an iterator state
    return {"pickle": base64.b64encode(pickle.dumps(state)).decode()}


def _decode_data_state(blob: dict) -> Any:
  if "json" in blob:
    return blob["json"]
  return pickle.loads(base64.b64decode(blob["pickle"]))


# Orbax splits every replicated shard among its replicas so that they share the writing; each
# piece is cut by an eager slice compiled per device, shape and offset (hundreds of compiles on a
# first save: ~7 s on a 2-core CPU for the tiny model replicated on 8 devices). Splitting pays for
# large arrays only, so pieces under 1 MiB are written whole by one replica. The files are the
# same either way.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
  handler = ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),   # as orbax's default handler
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  absl_logger = logging.getLogger("absl")   # orbax warns on every override; this one is ours
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


class RestoreError(RuntimeError):
  pass


class MismatchError(ValueError):
  """The checkpoint reads but does not fit what it is restored into (names every offender)."""


class Checkpointer:
  """`save(step, state, data_state, meta)` / `restore(abstract_state)` under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def _data_state_file(self, step: int, process: int) -> str:
    return os.path.join(self.directory, "data_states", str(step), f"process_{process}.json")

  def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None,
           *, force: bool = False) -> bool:
    """Orbax writes the arrays (all processes) and process 0's data state; with several
    processes each also keeps its own data-iterator state beside it, since every process
    reads a different part of the data."""
    if jax.process_count() > 1:
      path = self._data_state_file(step, jax.process_index())
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(_encode_data_state(data_state), f)
      os.replace(path + ".tmp", path)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_encode_data_state(data_state)),
        meta=ocp.args.JsonSave(meta or {}))
    return self.manager.save(step, args=args, force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state: Any):
    """(step, state, data_state, meta) of the newest loadable checkpoint, or None if none.

    `abstract_state` (`jax.ShapeDtypeStruct`s with shardings) is the layout to restore into.
    When checkpoints exist but none loads (a changed model size, trainable set or mesh), it is
    an error rather than a silent fresh start.
    """
    def load(step):
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
      data = restored["data"]
      own = self._data_state_file(step, jax.process_index())
      if jax.process_count() > 1 and os.path.exists(own):
        with open(own) as f:
          data = json.load(f)
      return restored["state"], _decode_data_state(data), dict(restored["meta"])

    found = self._newest_loadable(load, "If the model size, trainable modules or mesh changed, "
                                  "start a new --workdir (and pass this one as "
                                  "--config.init_from).")
    return None if found is None else (found[0], *found[1])

  def restore_sharded(self, paths, target):
    """(step, tree) of the newest loadable checkpoint, or None if none: the subtrees at `paths`
    restored straight onto devices. `target(saved)` gets the saved subtrees (orbax metadata
    leaves: `.shape`, `.dtype`) and returns, for the same tree, the `jax.sharding.Sharding` and
    dtype each leaf should have as `(sharding, dtype)` pairs. Each process reads only the
    pieces its devices hold; no host ever holds the whole tree, and the optimizer state is
    never read. A ValueError from `target` (shapes that do not fit) is raised as a
    MismatchError, not taken for a damaged checkpoint."""
    def load(step):
      path = epath.Path(self.directory) / str(step) / "state"
      reader = ocp.PyTreeCheckpointHandler()
      try:
        wanted = _subtrees(reader.metadata(path).tree, paths)
        try:
          placed = target(wanted)
        except ValueError as e:
          raise MismatchError(str(e)) from e
        args = jax.tree.map(
            lambda meta, want: ocp.ArrayRestoreArgs(sharding=want[0], dtype=want[1],
                                                    global_shape=tuple(meta.shape)),
            wanted, placed)
        return reader.restore(path, args=ocp.args.PyTreeRestore(
            wanted, restore_args=args, partial_restore=True))
      finally:
        reader.close()

    return self._newest_loadable(load, "The files are damaged or incomplete; copy the workdir "
                                 "again or train it again.", passes=(MismatchError,))

  def _newest_loadable(self, load, hint: str, passes: tuple = ()):
    """(step, load(step)) for the newest step that loads. A newest checkpoint that fails is
    reported in one line and the one before it tried; none loading is a RestoreError."""
    errors = []
    for step in reversed(self.all_steps()):
      try:
        return step, load(step)
      except passes:          # the caller's own verdict (e.g. shapes that do not fit)
        raise
      except Exception as e:  # unreadable or incompatible: try the previous one
        errors.append((step, e))
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: checkpoint step {step} is unreadable ({type(e).__name__}: {reason}); "
              f"trying the previous checkpoint in {self.directory}", flush=True)
    if errors:
      first_step, first = errors[0]
      raise RestoreError(
          f"none of the checkpoints in {self.directory} (steps {[s for s, _ in errors]}) could "
          f"be restored; step {first_step} failed with {type(first).__name__}: "
          f"{str(first)[:500]}. {hint}")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _subtrees(tree: dict, paths) -> dict:
  """The nested dict holding only `tree`'s entries at the key `paths`."""
  out: dict = {}
  for path in paths:
    source, target = tree, out
    for key in path[:-1]:
      source, target = source[key], target.setdefault(key, {})
    target[path[-1]] = source[path[-1]]
  return out
