"""JAX vs vita_torch vs transformers through `python -m vita_jax.verify`, on a tiny random
checkpoint converted with `python -m vita_jax.convert`, in both layouts and both dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vita_torch
from vita_jax import cli, convert, verify
from vita_torch import testing


def convert_main(argv):
  return cli.invoke(convert.main, convert.FLAGS, ["vita_jax.convert", *argv])


def verify_main(argv):
  return cli.invoke(verify.main, verify.FLAGS, ["vita_jax.verify", *argv])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A transformers-made internvl directory and its vita_jax.convert'ed long_vita twin."""
  internvl = str(tmp_path_factory.mktemp("internvl"))
  testing.make_internvl_checkpoint(internvl, seed=7)
  long_vita = str(tmp_path_factory.mktemp("converted") / "long_vita")
  assert convert_main([internvl, long_vita, "--layout=long_vita"]) == 0
  return {"internvl": internvl, "long_vita": long_vita}


def test_verify_cli_passes_on_converted_checkpoint(dirs, capsys):
  assert verify_main([f"--model={dirs['long_vita']}", "--against=torch,transformers"]) == 0
  out = capsys.readouterr().out
  print(out)                                         # the table, for -s runs
  assert "long_vita layout, float32" in out
  table = [line for line in out.splitlines() if line.startswith(("torch ", "transformers "))]
  assert len(table) == 10                            # 2 frameworks x (3 logits + 2 vision)
  assert all(line.endswith("PASS") for line in table)
  for case in ("text", "images", "packing"):
    assert any(f" {case} " in line for line in table)
  assert "10/10 within tolerance" in out


def test_jax_vs_torch_internvl_layout_fp32(dirs):
  rows = verify.verify(dirs["internvl"], "float32", ["torch"], out=lambda *_: None)
  assert len(rows) == 5 and all(r["ok"] for r in rows)
  assert max(r["max"] for r in rows) < 1e-5          # far inside the 1e-4 budget


def test_jax_vs_torch_bf16(dirs):
  rows = verify.verify(dirs["long_vita"], "bfloat16", ["torch"], out=lambda *_: None)
  assert len(rows) == 5 and all(r["ok"] for r in rows)


def test_verify_fails_when_frameworks_disagree(dirs, monkeypatch, capsys):
  load = vita_torch.load_pretrained

  def broken(*args, **kwargs):                       # one decoder weight slightly off
    model = load(*args, **kwargs)
    with torch.no_grad():
      model.model.layers[0].mlp.down_proj.weight[:4] += 0.05
    return model

  monkeypatch.setattr(vita_torch, "load_pretrained", broken)
  assert verify_main([f"--model={dirs['internvl']}", "--against=torch"]) == 1
  out = capsys.readouterr().out
  assert "FAIL" in out and "FAILED: torch/text/logits" in out


def test_verify_rejects_unknown_framework(dirs, capsys):
  assert verify_main([f"--model={dirs['internvl']}", "--against=tensorflow"]) == 2
  assert "tensorflow" in capsys.readouterr().err


def test_release_shaped_checkpoint_from_jax(tmp_path, capsys):
  """A vita_jax model of the configs/base.py `tiny` size (bias-free projector of the vision
  width, as in the release) saved by vita_jax.save_pretrained: vita_torch reads it exactly;
  transformers cannot express that projector and is skipped with a note."""
  import jax
  from flax import nnx

  import vita_jax
  from configs import base
  from vita_jax.models.vlm import LongVITA

  cfg = base.model_config("tiny")
  cfg.compute_dtype, cfg.remat = "float32", "none"
  cfg.projector.hidden_size = 96                     # != vision (64) and != llm (128) width
  model = LongVITA(cfg, rngs=nnx.Rngs(0))
  leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(1)                     # numpy: no per-shape JAX compilation
  noisy = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32) for x in leaves]
  nnx.update(model, jax.tree.unflatten(tree, noisy))
  vita_jax.save_pretrained(model, str(tmp_path), layout="long_vita")

  torch_model = vita_torch.load_pretrained(str(tmp_path), device="cpu")
  assert torch_model.model.vision_projection.mlp[0].bias is None
  rows = verify.verify(str(tmp_path), "float32", ["torch", "transformers"])
  assert "transformers skipped" in capsys.readouterr().out
  assert len(rows) == 5 and all(r["ok"] for r in rows)
  assert {r["framework"] for r in rows} == {"torch"}
