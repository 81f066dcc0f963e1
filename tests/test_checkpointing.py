"""Training checkpoints: round trip with the data-iterator state, keep-last-K, and falling back
past a corrupt newest checkpoint, for the trainer and for readers of a workdir's weights;
metrics.jsonl is cut back to the restored step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.checkpoints.run import Checkpointer, RestoreError
from vita_jax.checkpoints.workdir import read_workdir_params
from vita_jax.errors import InputError
from vita_jax.training.metrics import MetricsWriter, read_metrics


def _state(v):
  return {"params": {"w": jnp.full((4, 3), v, jnp.float32)}, "step": jnp.int32(v)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_round_trip_keep_last_and_corrupt_fallback(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path / "ck"), keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"pos": step, "blob": b"\x00\x01"}, {"stage": 2})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]                         # keep-last-2
  step, state, data, meta = ckpt.restore(_abstract(_state(0)))
  assert step == 3 and data == {"pos": 3, "blob": b"\x00\x01"} and meta == {"stage": 2}
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 3.0))

  # Corrupt every file of the newest checkpoint's state: restore reports it, uses step 2.
  for root, _, files in os.walk(tmp_path / "ck" / "3" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  step, state, data, _ = Checkpointer(str(tmp_path / "ck"), keep=2).restore(
      _abstract(_state(0)))
  assert step == 2 and data["pos"] == 2
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 2.0))
  assert "checkpoint step 3 is unreadable" in capsys.readouterr().out


def test_incompatible_checkpoints_are_an_error_not_a_fresh_start(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "ck"), keep=2)
  ckpt.save(1, _state(1), {"pos": 1})
  ckpt.close()
  other = {"params": {"w": jnp.zeros((5, 3), jnp.float32)}, "step": jnp.int32(0)}
  with pytest.raises(RestoreError, match="could be restored.*new --workdir"):
    Checkpointer(str(tmp_path / "ck")).restore(_abstract(other))


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
  writer = MetricsWriter(str(tmp_path), resume_step=0)
  for step in range(1, 6):
    writer.write(step, {"loss": 1.0 / step, "bad": float("nan")})
  writer.close()
  MetricsWriter(str(tmp_path), resume_step=3).close()
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[0]["bad"] == "nan" and json.dumps(records)   # NaN kept visible, valid JSON


def _workdir_checkpoint(ckpt: Checkpointer, step: int):
  """A checkpoint laid out as vita_jax.train saves it (train state + frozen variables)."""
  params = {"llm": {"w": jnp.full((64, 8), step, jnp.float32)}}
  frozen = {"vision": {"b": jnp.full((8,), -step, jnp.float32)}}
  state = {"params": params, "opt_state": {"mu": jnp.zeros((64, 8))}, "step": jnp.int32(step)}
  ckpt.save(step, {"state": state, "frozen": frozen}, {"pos": step})


def _truncate_largest_file(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_workdir_weights_fall_back_past_a_truncated_newest_checkpoint(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  for step in (1, 2):
    _workdir_checkpoint(ckpt, step)
  ckpt.close()
  assert read_workdir_params(str(tmp_path))[("llm", "w")][0, 0] == 2.0

  _truncate_largest_file(tmp_path / "checkpoints" / "2")
  weights = read_workdir_params(str(tmp_path))
  out = capsys.readouterr().out
  assert set(weights) == {("llm", "w"), ("vision", "b")}       # no optimizer state
  np.testing.assert_array_equal(weights[("llm", "w")], np.full((64, 8), 1.0))
  np.testing.assert_array_equal(weights[("vision", "b")], np.full((8,), -1.0))
  warnings = [line for line in out.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint step 2 is unreadable" in warnings[0]

  _truncate_largest_file(tmp_path / "checkpoints" / "1")
  with pytest.raises(InputError, match=r"none of the checkpoints .*\(steps \[2, 1\]\)"):
    read_workdir_params(str(tmp_path))
