"""The environment for `launch/local.sh` runs started by tests."""

import os


def launch_env(**extra: str) -> dict:
  """This process's environment for a multi-process launch, less what must not carry over.

  `launch/local.sh` replaces the fake-device count in XLA_FLAGS (the other flags stay) and each
  process sets its own PJRT_NPROC. The persistent compilation cache stays off: a process that
  loads its step from the cache reaches the first collective while its peer still compiles,
  and gloo gives up on the slower one after 30 s.
  """
  drop = ("PJRT_NPROC", "JAX_COMPILATION_CACHE_DIR", "SLURM_JOB_ID")
  return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}
