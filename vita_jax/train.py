"""Train Long-VITA, any stage, any mesh:

    python -m vita_jax.train --config=configs/stage2.py:tiny --workdir=runs/demo

Writes `WORKDIR/metrics.jsonl` (step, loss, lr, tokens_per_s, grad_norm, mfu, skip counts),
TensorBoard events under `WORKDIR/tensorboard`, and checkpoints under `WORKDIR/checkpoints`.
Re-running the same command resumes from the newest complete checkpoint; SIGTERM saves one
before exiting. Overrides: `--config.train.steps=50 --config.mesh.seq=4 ...`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import flags, logging

from vita_jax import cli
from vita_jax.checkpoints.run import Checkpointer, RestoreError
from vita_jax.errors import ConfigError
from vita_jax.parallel.mesh import make_mesh
from vita_jax.spec.tokens import tokens_per_tile
from vita_jax.training import validation
from vita_jax.training.batching import DataShard, global_batch, stack_micro_batches

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, "
                               "tensorboard/. An existing one is resumed.")
flags.mark_flag_as_required("workdir")


class NonFiniteLossError(RuntimeError):
  pass


def maybe_initialize_distributed() -> None:
  """Join a multi-process run when a launcher set one up (JAX coordinator env, SLURM, TPU)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(env["JAX_PROCESS_ID"]))
  elif (env.get("SLURM_NTASKS", "1") != "1" or env.get("TPU_WORKER_HOSTNAMES")
        or env.get("VITA_DISTRIBUTED") == "auto"):
    jax.distributed.initialize()


def build_model(config, mesh):
  """A freshly initialised model whose parameters are created already sharded on `mesh`.

  Initialisation runs as one jitted program (cached per model config, seed and mesh): no
  device ever holds the unsharded model, and there is no per-parameter eager dispatch.
  """
  from flax import nnx
  graphdef, init = _initializer(config.model.to_json(), int(config.train.seed), mesh)
  return nnx.merge(graphdef, init())


@functools.lru_cache(maxsize=8)
def _initializer(model_json: str, seed: int, mesh):
  import ml_collections
  from flax import nnx

  from vita_jax.models.vlm import LongVITA
  from vita_jax.parallel.sharding import state_shardings
  model_cfg = ml_collections.ConfigDict(json.loads(model_json))

  def create():
    return LongVITA(model_cfg, rngs=nnx.Rngs(seed), mesh=mesh)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
  out = state_shardings(abstract_state, mesh) if mesh is not None else None
  return graphdef, jax.jit(lambda: nnx.split(create())[1], out_shardings=out)


def load_initial_weights(config, model) -> None:
  """Apply `init_from` / `init_from_llm` / `init_from_vision` to a fresh model, in place.

  `init_from` is a previous stage's workdir or an HF directory (either layout) and must cover
  every parameter; the stage-1 sources cover only the LLM or the vision tower.
  """
  from vita_jax.checkpoints import workdir as wd
  from vita_jax.checkpoints.init_sources import read_weights
  if config.init_from:
    if not os.path.exists(config.init_from):
      raise ConfigError(f"init_from={config.init_from!r} does not exist; pass a previous "
                        "stage's workdir or a Hugging Face checkpoint directory")
    if wd.is_workdir(config.init_from):     # read straight onto this run's shardings
      wd.restore_workdir_params(model, config.init_from)
    else:
      wd.assign_params(model, read_weights(config.init_from, config.model),
                       source=config.init_from, require_all=True)
  for path, part in ((config.init_from_llm, "llm"), (config.init_from_vision, "vision")):
    if path:
      weights = read_weights(path, config.model, part=part)
      wd.assign_params(model, weights, source=path, prefix=(part,), require_all=True)


def train(config, workdir: str, devices=None) -> dict:
  """Run (or resume) training; returns the last logged metrics. `devices` (default: all)
  lets tests compare meshes of different sizes in one process."""
  from tqdm import tqdm

  from vita_jax.data.pipeline import make_train_iterator
  from vita_jax.training import flops as flops_lib
  from vita_jax.training import optim
  from vita_jax.training import state as train_state
  from vita_jax.training import step as train_step
  from vita_jax.training.metrics import MetricsWriter

  maybe_initialize_distributed()
  devices = list(jax.devices() if devices is None else devices)
  shape = validation.validate(config, len(devices))
  mesh = make_mesh(config.mesh, devices)
  primary = jax.process_index() == 0
  train_cfg = config.train
  accum = int(train_cfg.grad_accum)

  if primary:
    from vita_jax.checkpoints.workdir import CONFIG_FILE, save_config
    _report_config_changes(os.path.join(workdir, CONFIG_FILE), config)
    save_config(config, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=train_cfg.keep_checkpoints)
  model = build_model(config, mesh)
  if ckpt.latest_step() is None:        # a resumed run has its own weights
    load_initial_weights(config, model)
  split, params, frozen = train_state.split_model(model, tuple(train_cfg.trainable))
  del model
  tx, schedule = optim.make_optimizer(params, split.trainable_axes, train_cfg)

  state_sh, frozen_sh = train_state.state_shardings(tx, split, params, frozen, mesh)
  frozen = jax.device_put(frozen, frozen_sh)
  # Params are donated: the state holds the same (placed) buffers, not a copy.
  state = jax.jit(functools.partial(train_state.initial_state, tx), out_shardings=state_sh,
                  donate_argnums=(0,))(jax.device_put(params, state_sh["params"]))
  del params

  step_fn = jax.jit(train_step.make_train_step(split, tx, schedule, config),
                    donate_argnums=(0,), out_shardings=(state_sh, None))

  # Data: micro-batches of global_batch / grad_accum rows, this process's share only.
  data_cfg = copy.deepcopy(config)
  with data_cfg.unlocked():
    data_cfg.data.global_batch_size = config.data.global_batch_size // accum
  shard = DataShard(mesh, data_cfg.data.global_batch_size)
  data_iter = make_train_iterator(data_cfg, seq_shards=shape["seq"],
                                  process_index=shard.index, process_count=shard.count)

  evaluate = (_make_evaluator(config, split, shape, mesh, shard) if train_cfg.eval_every
              else None)
  start_step = 0
  abstract = {"state": train_state.abstract_like(state, state_sh),
              "frozen": train_state.abstract_like(frozen, frozen_sh)}
  restored = ckpt.restore(abstract)
  if restored is not None:
    start_step, tree, data_state, meta = restored
    state, frozen = tree["state"], tree["frozen"]
    data_iter.set_state(data_state)
    print(f"resumed from {ckpt.directory} at step {start_step}", flush=True)
  writer = MetricsWriter(workdir, enabled=primary, resume_step=start_step)

  peak = float(train_cfg.peak_tflops_per_device) * 1e12 * len(devices)
  if peak <= 0:
    peak = flops_lib.measure_peak_flops()
    print(f"measured peak: {peak / 1e9:.1f} GFLOP/s (fp32 matmul, whole machine)", flush=True)

  preempted_at = _preemption_check()

  def save(step: int, force: bool = False):
    ckpt.save(step, {"state": state, "frozen": frozen}, data_iter.get_state(),
              {"stage": config.stage, "size": config.model.size}, force=force)

  def check_finite(metrics, step: int):
    consecutive = int(metrics["nonfinite_consecutive"])
    if consecutive >= train_cfg.max_consecutive_nonfinite:
      ckpt.wait()
      raise NonFiniteLossError(
          f"{consecutive} consecutive steps up to step {step} had a non-finite loss or "
          "gradient; those updates were skipped, so the parameters are those of step "
          f"{step - consecutive}. Lower train.peak_lr, check the data, or resume from the last "
          "checkpoint.")

  last: dict = {}
  previous = None
  window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
  progress = tqdm(total=train_cfg.steps, initial=start_step, disable=not primary,
                  dynamic_ncols=True, desc=f"stage {config.stage}")
  for step in range(start_step, train_cfg.steps):
    micro = [next(data_iter) for _ in range(accum)]
    stacked, counters = stack_micro_batches(micro, tokens_per_tile(config.model), shard)
    tokens = int(sum((m["segment_ids"] > 0).sum() for m in micro)) * shard.count
    tiles = int(sum(int(m.get("num_tiles", 0)) for m in micro)) * shard.count
    window_tokens += tokens
    window_flops += flops_lib.train_flops_per_step(
        config.model, batch=config.data.global_batch_size, seq_len=config.data.seq_len,
        tiles=tiles, trainable=tuple(train_cfg.trainable))
    state, metrics = step_fn(state, frozen, global_batch(stacked, mesh, shard))
    done = step + 1
    progress.update(1)
    stop = preempted_at(done)
    if previous is not None:     # one step late, so the host never waits on the device
      check_finite(previous, done - 1)
    previous = metrics

    eval_now = evaluate is not None and (done % train_cfg.eval_every == 0
                                         or done == train_cfg.steps)
    log_now = (done % train_cfg.log_every == 0 or done == train_cfg.steps or eval_now or stop)
    if log_now:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - window_start
      last = dict(loss=float(metrics["loss"]), lr=float(metrics["lr"]),
                  tokens_per_s=window_tokens / elapsed, grad_norm=float(metrics["grad_norm"]),
                  mfu=window_flops / elapsed / peak,
                  supervised_tokens=int(metrics["supervised_tokens"]),
                  nonfinite_steps=int(metrics["nonfinite_total"]))
      last.update({k: _scalar(v) for k, v in counters.items()})
      if eval_now:
        last["eval_loss"] = evaluate(state["params"], frozen)
      writer.write(done, last)
      progress.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                           mfu=f"{last['mfu']:.1%}",
                           **({"eval": f"{last['eval_loss']:.4f}"} if eval_now else {}))
      check_finite(metrics, done)
      window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0

    if done % train_cfg.checkpoint_every == 0 or done == train_cfg.steps or stop:
      save(done, force=stop)
    if stop:
      ckpt.close()
      writer.close()
      print(f"SIGTERM: saved a checkpoint at step {done}; exiting", flush=True)
      sys.exit(143)
  progress.close()
  ckpt.close()
  writer.close()
  return last


def _preemption_check():
  """step -> whether to save and stop now, after a SIGTERM (a preemption notice).

  One process: the step after its own SIGTERM. Several: JAX's preemption service passes a
  SIGTERM received by any process to all of them and picks one step they all reach
  (`reached_preemption_sync_point`, called by every process at every step), so all save the
  same step together. The service installs its own SIGTERM handler, so ours is only for one
  process.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point
  flag = {"set": False}
  signal.signal(signal.SIGTERM, lambda *_: flag.update(set=True))
  return lambda step: flag["set"]


def _report_config_changes(path: str, config) -> None:
  """Resuming with a different config is allowed (e.g. more steps) but never silent."""
  if not os.path.exists(path):
    return
  from vita_jax.checkpoints.workdir import flatten
  with open(path) as f:
    before = flatten(json.load(f))
  after = flatten(json.loads(config.to_json()))
  changed = [f"{'.'.join(k)}: {before.get(k)!r} -> {after.get(k)!r}"
             for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
  if changed:
    print("note: this workdir was started with a different config; now: " + "; ".join(changed)
          + " (the LR schedule follows the new train.steps)", flush=True)


def _make_evaluator(config, split, shape, mesh, shard: DataShard):
  """Held-out loss over the first `train.eval_batches` batches of `data.eval_manifest`
  (supervised-token mean), computed with the training model's current parameters."""
  from vita_jax.data.pipeline import make_train_iterator
  from vita_jax.training import step as train_step
  eval_step = jax.jit(train_step.make_eval_step(split, config))
  tpt = tokens_per_tile(config.model)

  def evaluate(params, frozen) -> float:
    batches = make_train_iterator(config, seq_shards=shape["seq"], split="eval",
                                  process_index=shard.index, process_count=shard.count)
    loss_sum, count = 0.0, 0.0
    for _, batch in zip(range(config.train.eval_batches), batches):
      stacked, _ = stack_micro_batches([batch], tpt, shard)
      s, c = eval_step(params, frozen, global_batch(stacked, mesh, shard))
      loss_sum, count = loss_sum + float(s), count + float(c)
    return loss_sum / max(count, 1.0)

  return evaluate


def _scalar(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (NonFiniteLossError, RestoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from e


if __name__ == "__main__":
  cli.run(main)
