"""Training checkpoints: round trip with the data-iterator state, keep-last-K, and falling back
past a corrupt newest checkpoint, for the trainer and for readers of a workdir's weights;
metrics.jsonl is cut back to the restored step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vita_jax.checkpoints.run import Checkpointer, RestoreError
from vita_jax.checkpoints.workdir import restore_workdir_params
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
  frozen = {"vision": {"w": jnp.full((8,), -step, jnp.float32)}}
  state = {"params": params, "opt_state": {"mu": jnp.zeros((64, 8))}, "step": jnp.int32(step)}
  ckpt.save(step, {"state": state, "frozen": frozen}, {"pos": step})


def _truncate_largest_file(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


class _Part(nnx.Module):
  def __init__(self, shape):
    self.w = nnx.Param(jnp.zeros(shape, jnp.float32))


class _Tiny(nnx.Module):
  """Parameters at the paths `_workdir_checkpoint` saves: llm.w (trainable), vision.w (frozen)."""

  def __init__(self, llm_shape=(64, 8)):
    self.llm, self.vision = _Part(llm_shape), _Part((8,))


def _weights(model):
  return {k: np.asarray(v) for k, v in (("llm", model.llm.w.get_value()),
                                        ("vision", model.vision.w.get_value()))}


def test_workdir_weights_fall_back_past_a_truncated_newest_checkpoint(tmp_path, capsys):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  for step in (1, 2):
    _workdir_checkpoint(ckpt, step)
  ckpt.close()
  model = _Tiny()
  assert sorted(restore_workdir_params(model, str(tmp_path))) == [("llm", "w"), ("vision", "w")]
  assert _weights(model)["llm"][0, 0] == 2.0          # the newest; no optimizer state read

  _truncate_largest_file(tmp_path / "checkpoints" / "2")
  model = _Tiny()
  restore_workdir_params(model, str(tmp_path))
  out = capsys.readouterr().out
  np.testing.assert_array_equal(_weights(model)["llm"], np.full((64, 8), 1.0))
  np.testing.assert_array_equal(_weights(model)["vision"], np.full((8,), -1.0))
  warnings = [line for line in out.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint step 2 is unreadable" in warnings[0]

  _truncate_largest_file(tmp_path / "checkpoints" / "1")
  with pytest.raises(InputError, match=r"none of the checkpoints .*\(steps \[2, 1\]\)"):
    restore_workdir_params(_Tiny(), str(tmp_path))


def test_workdir_weights_restore_onto_the_models_sharding_and_name_a_misfit(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  _workdir_checkpoint(ckpt, 5)
  ckpt.close()
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  model = _Tiny()
  sharding = NamedSharding(mesh, P("a", "b"))
  model.llm.w.set_value(jax.device_put(model.llm.w.get_value(), sharding))
  restore_workdir_params(model, str(tmp_path))
  restored = model.llm.w.get_value()
  assert restored.sharding == sharding                 # restored onto the model's placement
  assert {s.data.shape for s in restored.addressable_shards} == {(16, 4)}
  np.testing.assert_array_equal(np.asarray(restored), np.full((64, 8), 5.0))

  # A model of another shape is one error naming the parameter, not a skipped checkpoint.
  with pytest.raises(ValueError, match=r"llm\.w: checkpoint \(64, 8\) vs model \(32, 8\)"):
    restore_workdir_params(_Tiny(llm_shape=(32, 8)), str(tmp_path))
