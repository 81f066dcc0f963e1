"""Figure 7 (`python -m benchmarks.gpu`): the smoke run on the CPU runs every part in its own
subprocess and writes JSON rows with finite positive numbers and the markdown table."""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow   # ~60-80 s on 2 cores: seven subprocesses, each importing JAX or torch
def test_gpu_figure_smoke_writes_every_part(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out",
                         str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "gpu-latest.json").read_text())
  assert result["mode"] == "smoke"
  assert set(result["parts"]) == set(gpu.PARTS)
  for name, part in result["parts"].items():
    assert "error" not in part and not part["errors"], (name, part)
    assert part["platform"] == "cpu" and part["values"], name
  assert set(result["figures"]) == set(gpu.GROUPS)
  for group, fig in result["figures"].items():
    assert "error" not in fig, (group, fig)
    rows = fig["rows"]
    assert rows and any(_positive(r["ours"]) for r in rows), group
    for row in rows:
      assert row["passed"] is None, row            # no target is judged on a CPU smoke run
      if row["ours"] is None:                      # only what cannot exist here may be empty
        assert "n/a" in row["note"] or "not available" in row["note"], row
      else:
        assert _positive(row["ours"]), row
      for key in ("baseline", "ratio"):
        assert row[key] is None or _positive(row[key]), row
  metrics = [r["metric"] for fig in result["figures"].values() for r in fig["rows"]]
  assert sum("ring_attention" in m for m in metrics) == 2
  assert any(m.startswith("decode tokens/s (batch 1)") for m in metrics)
  decode = next(r for r in result["figures"]["decode"]["rows"] if r["baseline_name"] ==
                "transformers generate()")
  assert _positive(decode["baseline"])
  table = (tmp_path / "gpu-latest.md").read_text()
  assert "| 7 gpu |" in table and "Conventions:" in table and "| prefill_torch |" in table


def test_flop_convention_and_device_table():
  # 4 S^2 H D / 2 forward, x2.5 for forward + backward.
  assert gpu.attention_flops(1024, 16, 128, 1) == 2.5 * 4 * 1024 * 1024 * 16 * 128 / 2
  assert gpu.device_spec("NVIDIA H200")["hbm_bytes_per_s"] == 4.8e12
  assert gpu.device_spec("NVIDIA H200")["bf16_flops"] == 989e12
  assert gpu.device_spec("cpu") is None
