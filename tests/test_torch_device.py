"""vita_torch.device: auto selection, the npu guard, backends, and single-process init."""

from __future__ import annotations

import logging

import pytest
import torch

from vita_torch import device as dev


@pytest.fixture
def no_accelerators(monkeypatch):
  """This machine as the CI sees it: no torch_npu and no CUDA (forced, whatever is installed)."""
  monkeypatch.setattr(dev, "_import_torch_npu", lambda: False)
  monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_picks_cpu_and_says_so(no_accelerators, caplog):
  with caplog.at_level(logging.WARNING, logger="vita_torch"):
    assert dev.resolve_device("auto") == torch.device("cpu")
  assert "picked cpu" in caplog.text
  assert dev.backend_for("auto") == "gloo"


def test_npu_without_torch_npu_is_a_clear_error(no_accelerators):
  with pytest.raises(RuntimeError, match="torch_npu is not installed.*torch-npu"):
    dev.resolve_device("npu")
  assert not dev.npu_available()
  assert dev.device_count("npu") == 0


def test_real_import_guard_without_torch_npu():
  try:
    import torch_npu  # noqa: F401
    pytest.skip("torch_npu is installed here")
  except ImportError:
    pass
  dev._import_torch_npu.cache_clear()
  assert dev._import_torch_npu() is False
  with pytest.raises(RuntimeError, match="npu"):
    dev.resolve_device("npu:0")


def test_cuda_without_cuda_is_a_clear_error(no_accelerators):
  with pytest.raises(RuntimeError, match="cuda"):
    dev.resolve_device("cuda")


def test_auto_prefers_npu_then_cuda(monkeypatch):
  monkeypatch.setattr(dev, "npu_available", lambda: False)
  monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
  monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
  monkeypatch.setenv("LOCAL_RANK", "3")
  assert dev.resolve_device("auto") == torch.device("cuda:1")     # LOCAL_RANK mod count
  monkeypatch.setattr(dev, "npu_available", lambda: True)
  assert dev.auto_kind() == "npu"     # (a torch.device("npu") needs torch_npu to exist)


def test_backends_and_bad_names():
  assert [dev.backend_for(k) for k in ("npu", "cuda:1", "cpu")] == ["hccl", "nccl", "gloo"]
  with pytest.raises(ValueError, match="tpu"):
    dev.resolve_device("tpu")
  assert dev.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_init_distributed_without_torchrun_is_single_process(no_accelerators, monkeypatch):
  monkeypatch.delenv("WORLD_SIZE", raising=False)
  assert dev.init_distributed("auto") == torch.device("cpu")
  assert not torch.distributed.is_initialized()


def test_load_pretrained_on_auto_device(tmp_path, no_accelerators):
  import vita_torch
  from vita_torch import testing
  testing.make_internvl_checkpoint(str(tmp_path))
  model = vita_torch.load_pretrained(str(tmp_path), dtype="bfloat16")
  assert model.device == torch.device("cpu") and model.dtype == torch.bfloat16
  with pytest.raises(RuntimeError, match="torch_npu"):
    vita_torch.load_pretrained(str(tmp_path), device="npu")
