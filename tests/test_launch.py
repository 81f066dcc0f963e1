"""Launchers: exact --dry-run commands, fail-fast local runs, and real multi-process JAX.

The multi-process tests start separate Python processes through `launch/local.sh`, each with
its own fake CPU devices, joined by `jax.distributed` on localhost.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

from tests import row_data
from tests.multiprocess import launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def run(args, env=None, timeout=120):
  return subprocess.run(args, cwd=ROOT, env=launch_env(**(env or {})), capture_output=True,
                        text=True, timeout=timeout)


def test_local_dry_run_prints_one_command_per_process():
  # XLA_FLAGS of this process (fake devices, the flag vita_jax adds) must not leak into the
  # expected command: start from none.
  out = run([f"{LAUNCH}/local.sh", "--dry-run", "--port=4567", "2", "4", "--",
             "python", "-c", "print('a b')"], env={"XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words[:5])
    assert env == {"JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                   "JAX_COORDINATOR_ADDRESS": "127.0.0.1:4567",
                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
    assert words[5:] == ["python", "-c", "print('a b')"]


def test_local_keeps_other_xla_flags_and_replaces_device_count():
  out = run([f"{LAUNCH}/local.sh", "--dry-run", "1", "3", "--", "true"],
            env={"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"})
  env = dict(w.split("=", 1) for w in shlex.split(out.stdout)[:5])
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"


def test_local_rejects_bad_arguments():
  out = run([f"{LAUNCH}/local.sh", "2", "x", "--", "true"])
  assert out.returncode == 2 and "positive integers" in out.stderr
  out = run([f"{LAUNCH}/local.sh", "2", "4", "true"])
  assert out.returncode == 2 and "expected --" in out.stderr


def test_local_crashed_worker_stops_the_others_within_seconds():
  # Process 1 exits 7 at once; process 0 would sleep a minute unless it is stopped.
  code = ("import os, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '1': print('boom', flush=True); sys.exit(7)\n"
          "print('sleeping', flush=True); time.sleep(60)")
  start = time.monotonic()
  out = run([f"{LAUNCH}/local.sh", "2", "1", "--", sys.executable, "-c", code], timeout=30)
  elapsed = time.monotonic() - start
  assert out.returncode == 7, (out.stdout, out.stderr)
  assert elapsed < 10, f"local.sh took {elapsed:.1f}s to give up"
  assert "[p1] boom" in out.stdout
  assert "process 1 exited with code 7" in out.stderr


def test_local_success_prefixes_every_line():
  out = run([f"{LAUNCH}/local.sh", "3", "1", "--", "bash", "-c",
             "echo one $JAX_PROCESS_ID; echo two $JAX_PROCESS_ID >&2"])
  assert out.returncode == 0, out.stderr
  assert sorted(out.stdout.splitlines()) == sorted(
      [f"[p{i}] {w} {i}" for i in range(3) for w in ("one", "two")])


_PSUM = textwrap.dedent("""
    import json, os
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    local = np.arange(jax.local_device_count(), dtype=np.float32)
    local += jax.local_device_count() * jax.process_index() + 1
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local)
    total = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "x"), mesh=mesh,
                                  in_specs=P("x"), out_specs=P()))(x)
    print("RESULT " + json.dumps(dict(process=jax.process_index(), devices=jax.device_count(),
                                      local=jax.local_device_count(), psum=float(total[0]))))
""")


def test_two_processes_psum_over_eight_devices():
  out = run([f"{LAUNCH}/local.sh", "2", "4", "--", sys.executable, "-c", _PSUM], timeout=90)
  assert out.returncode == 0, out.stdout + out.stderr
  results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines()
                    if "RESULT " in line), key=lambda r: r["process"])
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert (r["devices"], r["local"]) == (8, 4)
    assert r["psum"] == sum(range(1, 9))   # every device's value reached every process


def test_tpu_pod_dry_run():
  out = run([f"{LAUNCH}/tpu_pod.sh", "--dry-run", "--tpu=my-v5p", "--zone=us-east5-a",
             "--project=proj", "--", "python", "-m", "vita_jax.train",
             "--config=configs/stage4.py", "--workdir=gs://bucket/stage 4"])
  assert out.returncode == 0, out.stderr
  words = shlex.split(out.stdout)
  assert words[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p",
                       "--zone=us-east5-a", "--project=proj", "--worker=all"]
  remote = words[9].removeprefix("--command=")
  assert remote.startswith("cd ~/long-vita && export VITA_DISTRIBUTED=auto && ")
  cmd = shlex.split(remote.split(" && ")[-1])
  assert cmd == ["python", "-m", "vita_jax.train", "--config=configs/stage4.py",
                 "--workdir=gs://bucket/stage 4"]


def test_tpu_pod_requires_name_and_zone():
  out = run([f"{LAUNCH}/tpu_pod.sh", "--dry-run", "--", "true"])
  assert out.returncode == 2 and "--tpu=NAME and --zone=ZONE" in out.stderr


def test_gpu_slurm_dry_run_outside_a_job_submits_then_sruns():
  out = run(["bash", f"{LAUNCH}/gpu_slurm.sbatch", "--dry-run", "--nodes=4", "--",
             "python", "-m", "vita_jax.train", "--config=configs/stage3.py"],
            env={"XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert shlex.split(lines[0]) == ["sbatch", "--nodes=4", f"{LAUNCH}/gpu_slurm.sbatch", "--",
                                   "python", "-m", "vita_jax.train", "--config=configs/stage3.py"]
  assert lines[1] == "# then, inside the job, on 32 GPUs:"
  assert shlex.split(lines[2]) == [
      "srun", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--kill-on-bad-exit=1",
      "--cpu-bind=none", "env", "VITA_DISTRIBUTED=auto", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
      "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
      "python", "-m", "vita_jax.train", "--config=configs/stage3.py"]


def test_gpu_slurm_dry_run_inside_a_job_uses_slurm_variables():
  env = {**os.environ, "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
         "SLURM_NTASKS_PER_NODE": "4(x2)", "XLA_FLAGS": ""}
  out = subprocess.run(["bash", f"{LAUNCH}/gpu_slurm.sbatch", "--dry-run", "--", "python", "x.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  words = shlex.split(out.stdout)
  assert words[:4] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"]
  assert words[-2:] == ["python", "x.py"]


def test_npu_torchrun_dry_run():
  out = run([f"{LAUNCH}/npu_torchrun.sh", "--dry-run", "--devices=0,1,2,3", "--master_port=29600",
             "--", "--model=ckpt", "--prompt=Describe the video", "--max_new_tokens=16"])
  assert out.returncode == 0, out.stderr
  assert shlex.split(out.stdout) == [
      "env", "ASCEND_RT_VISIBLE_DEVICES=0,1,2,3", "torchrun", "--nproc_per_node=4",
      "--nnodes=1", "--node_rank=0", "--master_addr=127.0.0.1", "--master_port=29600",
      "-m", "vita_torch.generate", "--model=ckpt", "--prompt=Describe the video",
      "--max_new_tokens=16", "--context_parallel"]


def test_npu_torchrun_rejects_bad_device_list():
  out = run([f"{LAUNCH}/npu_torchrun.sh", "--dry-run", "--devices=0,,1", "--", "--model=x"])
  assert out.returncode == 2 and "--devices=0,,1" in out.stderr


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(row["step"], row["loss"]) for row in map(json.loads, f)]


@pytest.mark.slow
def test_stage_chain_across_processes_matches_one_process(tmp_path):
  """Stage 2 on one process, then stage 3 from its workdir (`init_from`) with fsdp=4 x seq=2:
  as 2 processes x 4 devices (each restores only its own pieces of the sharded parameters)
  the losses equal 1 process x 8 devices, and they are not those of a fresh start. The data
  packs one sample per row, so both runs see the same global batches (tests/row_data.py)."""
  manifest = row_data.write_manifest(str(tmp_path / "data"))
  row_data.assert_one_sample_per_row(manifest, rows=4)
  common = ["--config.train.log_every=1", "--config.train.checkpoint_every=1000",
            "--config.train.eval_every=0", "--config.train.peak_tflops_per_device=1",
            *(f"--config.data.{k}={v}" for k, v in row_data.data_overrides(manifest, 4).items()),
            "--config.model.llm.num_layers=1", "--config.model.vision.num_layers=1",
            "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.seq=2"]
  stage2 = tmp_path / "stage2"
  out = run([sys.executable, "-m", "vita_jax.train", "--config=configs/stage2.py:tiny",
             "--config.train.steps=2", *common, f"--workdir={stage2}"], timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  stage3 = ["-m", "vita_jax.train", "--config=configs/stage3.py:tiny", "--config.train.steps=2",
            *common]
  chained = [*stage3, f"--config.init_from={stage2}"]
  one = run([sys.executable, *chained, f"--workdir={tmp_path / 'one'}"], timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  two = run([f"{LAUNCH}/local.sh", "2", "4", "--", sys.executable, *chained,
             f"--workdir={tmp_path / 'two'}"], timeout=600)
  assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
  fresh = run([sys.executable, *stage3, "--config.init_from=", "--config.train.steps=1",
               f"--workdir={tmp_path / 'fresh'}"], timeout=600)
  assert fresh.returncode == 0, fresh.stderr[-3000:]

  one, two, fresh = (_losses(tmp_path / d) for d in ("one", "two", "fresh"))
  assert [s for s, _ in one] == [1, 2] and [s for s, _ in two] == [1, 2]
  for (_, a), (_, b) in zip(one, two):
    assert b == pytest.approx(a, rel=1e-5)
  assert abs(one[0][1] - fresh[0][1]) > 1e-3 * abs(fresh[0][1])   # the stage-2 weights were used
