"""Which accelerator to run on, and the matching `torch.distributed` backend.

Ascend NPUs need the `torch_npu` plugin, which most machines do not have; it is imported only
inside `npu_available()` so that importing vita_torch never requires it.

    device = resolve_device("auto")          # npu -> cuda -> cpu, and logs the choice
    backend = backend_for(device)            # "hccl" | "nccl" | "gloo"
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("vita_torch")

KINDS = ("auto", "npu", "cuda", "cpu")
BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@functools.lru_cache(maxsize=1)
def _import_torch_npu() -> bool:
  try:
    import torch_npu  # noqa: F401  (registers torch.npu)
  except ImportError:
    return False
  return True


def npu_available() -> bool:
  """True when torch_npu imports and sees at least one NPU."""
  return _import_torch_npu() and hasattr(torch, "npu") and torch.npu.is_available()


def device_count(kind: str) -> int:
  """How many devices of `kind` ("npu", "cuda" or "cpu") this process can see."""
  if kind == "npu":
    return torch.npu.device_count() if npu_available() else 0
  if kind == "cuda":
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
  if kind == "cpu":
    return 1
  raise ValueError(f"unknown device kind {kind!r}; use one of npu, cuda, cpu")


def auto_kind() -> str:
  """The device kind "auto" means here: npu, else cuda, else cpu."""
  return "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None
                   ) -> torch.device:
  """A `torch.device` for "auto" | "npu" | "cuda" | "cpu" (an index such as "cuda:1" is kept).

  "auto" picks npu, then cuda, then cpu and logs which. Under torchrun the device index
  defaults to LOCAL_RANK so each process gets its own accelerator.
  """
  if isinstance(device, torch.device):
    return device
  kind, _, index = str(device).partition(":")
  if kind not in KINDS:
    raise ValueError(f"device {device!r} is not one of {', '.join(KINDS)} (optionally with "
                     "':index', e.g. 'cuda:0')")
  if kind == "auto":
    kind = auto_kind()
    log.warning("vita_torch: device='auto' picked %s", kind)
  elif kind == "npu" and not npu_available():
    reason = ("torch_npu is not installed" if not _import_torch_npu()
              else "torch_npu sees no NPU")
    raise RuntimeError(f"device 'npu' was requested but {reason}; install torch-npu matching "
                       f"torch {torch.__version__} with the CANN toolkit, or pass device='auto', "
                       "'cuda' or 'cpu'")
  elif kind == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("device 'cuda' was requested but torch.cuda.is_available() is False; "
                       "pass device='auto' or 'cpu'")
  if kind == "cpu":
    return torch.device("cpu")
  if not index:
    rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
    index = str(rank % max(1, device_count(kind)))
  return torch.device(f"{kind}:{index}")


def backend_for(device: str | torch.device) -> str:
  """The process-group backend for a device: hccl (npu), nccl (cuda) or gloo (cpu)."""
  kind = str(device).partition(":")[0]
  if kind == "auto":
    kind = resolve_device(device).type
  if kind not in BACKENDS:
    raise ValueError(f"no process-group backend known for device type {kind!r}")
  return BACKENDS[kind]


def init_distributed(device: str | torch.device = "auto") -> torch.device:
  """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
  environment) with the backend matching the device; returns this process's device.
  Without torchrun's variables it runs as a single process and creates no group."""
  import torch.distributed as dist
  dev = resolve_device(device)
  if "WORLD_SIZE" not in os.environ or dist.is_initialized():
    return dev
  if dev.type in ("cuda", "npu"):
    getattr(torch, dev.type).set_device(dev)
  dist.init_process_group(backend=backend_for(dev))
  return dev
