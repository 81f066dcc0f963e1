"""Coordinated preemption across processes: a SIGTERM to one process of a two-process run makes
both save the same step and exit 143; resuming gives the losses of an uninterrupted run, bit
for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.multiprocess import launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
ARGS = ["-m", "vita_jax.train", "--config=configs/stage3.py:tiny", f"--config.train.steps={STEPS}",
        "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
        "--config.mesh.data=1", "--config.mesh.seq=8", "--config.data.seq_len=256",
        "--config.data.global_batch_size=2", "--config.data.tiles_per_batch=16",
        "--config.train.eval_every=0", "--config.train.peak_tflops_per_device=1"]


def _launch(workdir) -> subprocess.Popen:
  env = launch_env()
  cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "4", "--", sys.executable, *ARGS,
         f"--workdir={workdir}"]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _worker(launcher: subprocess.Popen, process_id: int) -> psutil.Process:
  for child in psutil.Process(launcher.pid).children(recursive=True):
    try:
      if child.environ().get("JAX_PROCESS_ID") == str(process_id) and "vita_jax.train" in " ".join(
          child.cmdline()):
        return child
    except psutil.Error:
      continue
  raise AssertionError(f"no worker with JAX_PROCESS_ID={process_id}")


@pytest.mark.slow
def test_sigterm_to_one_process_saves_one_step_everywhere_and_resumes_exactly(tmp_path):
  whole = _launch(tmp_path / "whole")
  out = whole.communicate(timeout=600)[0]
  assert whole.returncode == 0, out[-3000:]
  want = _losses(tmp_path / "whole")
  assert sorted(want) == list(range(1, STEPS + 1))

  run = tmp_path / "preempted"
  first = _launch(run)
  deadline = time.time() + 300
  while not (os.path.exists(run / "metrics.jsonl") and len(_losses(run)) >= 2):
    assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
    time.sleep(0.2)
  _worker(first, 1).send_signal(signal.SIGTERM)
  out = first.communicate(timeout=300)[0]
  assert first.returncode == 143, out[-3000:]
  saved = {line.split("[")[1][:2]: line.rsplit("step ", 1)[1].split(";")[0]
           for line in out.splitlines() if "SIGTERM: saved a checkpoint at step" in line}
  assert set(saved) == {"p0", "p1"} and len(set(saved.values())) == 1, out[-3000:]
  step = int(saved["p0"])
  assert 2 <= step < STEPS
  assert sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit()) == [step]

  second = _launch(run)
  out = second.communicate(timeout=600)[0]
  assert second.returncode == 0, out[-3000:]
  assert "resumed from" in out and f"at step {step}" in out
  assert _losses(run) == want        # bitwise: the same floats at every step
