"""Every command treats a user's mistake the same way: one line `error: ...` naming the value and
the fix, exit code 2, no traceback; and prints no library INFO logs. Run in process through
`cli.invoke` (the same parse / guard / exit path as `python -m <command>`), plus one real
`python -m` run to show the exit code and the quiet stderr end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import vita_jax
from configs import base
from vita_jax import cli, convert, generate, verify
from vita_jax.data import demo, llava_convert
from vita_jax.data.tokenizer import load_tokenizer, token_ids, train_demo_tokenizer
from vita_jax.models.vlm import LongVITA
from vita_jax.spec import model as spec_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny HF model directory with its demo tokenizer, and good and bad media files."""
  root = tmp_path_factory.mktemp("cli")
  model_dir = str(root / "model")
  train_demo_tokenizer(["what colour is the square", "a red circle"] * 50, model_dir,
                       vocab_size=300)
  cfg = base.model_config("tiny")
  cfg.vision = spec_model.vision_config(28, 7, hidden=16, layers=1, heads=2, mlp=32)
  cfg.llm = spec_model.llm_config(vocab=320, hidden=24, layers=1, heads=3, kv_heads=1, ffn=40,
                                  max_positions=256)
  cfg.projector.hidden_size = 24
  cfg.compute_dtype, cfg.remat = "float32", "none"
  for key, value in token_ids(load_tokenizer(model_dir)).items():
    cfg.tokens[key] = value
  vita_jax.save_pretrained(LongVITA(cfg, rngs=nnx.Rngs(0)), model_dir, layout="long_vita")
  Image.fromarray(np.full((28, 28, 3), 200, np.uint8)).save(root / "ok.png")
  (root / "not_an_image.png").write_text("hello")
  (root / "not_a_video.mp4").write_text("hello")
  return {"model": model_dir, "root": root}


def _generate(files, *flags):
  return cli.invoke(generate.main, generate.FLAGS,
                    ["vita_jax.generate", f"--model={files['model']}", "--prompt=what colour",
                     "--max_new_tokens=2", *flags])


def _one_error_line(err: str, *needles: str) -> None:
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case, needles", [
    (lambda r: [f"--image={r / 'not_an_image.png'}"], ["not_an_image.png", "cannot be decoded",
                                                      "Pillow"]),
    (lambda r: [f"--video={r / 'not_a_video.mp4'}"], ["not_a_video.mp4", "cannot be decoded",
                                                     "PyAV"]),
    (lambda r: [f"--image={r / 'missing.png'}"], ["missing.png", "does not exist"]),
    (lambda r: ["--max_new_tokens=0"], ["max_new_tokens=0", "at least 1"]),
    (lambda r: ["--prompt=" + "what colour " * 200], ["maximum length 256", "shorten the prompt"]),
    (lambda r: ["--seq_shards=16"], ["seq_shards=16"]),
    (lambda r: ["--max_new_tokens=two"], ["max_new_tokens", "two"]),
], ids=["non-image", "non-video", "missing-file", "zero-tokens", "too-long", "bad-shards",
        "bad-int"])
def test_generate_mistakes_are_one_line_exit_2(files, capsys, case, needles):
  assert _generate(files, *case(files["root"])) == 2
  captured = capsys.readouterr()
  _one_error_line(captured.err, *needles)


def test_generate_good_request_still_works(files, capsys):
  assert _generate(files, f"--image={files['root'] / 'ok.png'}") == 0
  assert "new tokens" in capsys.readouterr().out


@pytest.mark.parametrize("command, argv, needles", [
    (convert, ["/nowhere/src", "/tmp/x"], ["/nowhere/src", "config.json"]),
    (convert, ["only_one"], ["expected SRC and DST"]),
    (convert, ["a", "b", "--layout=foo"], ["--layout", "long_vita"]),
    (verify, ["--model=/nowhere", "--against=tensorflow"], ["tensorflow", "torch"]),
    (verify, [], ["--model"]),
    (llava_convert, ["--input=/nowhere/x.json", "--out=/tmp/y.jsonl"], ["/nowhere/x.json"]),
], ids=["convert-no-config", "convert-args", "convert-layout", "verify-framework",
        "verify-required", "llava-missing"])
def test_other_commands_fail_the_same_way(command, argv, needles, capsys):
  assert cli.invoke(command.main, command.FLAGS, [command.__name__, *argv]) == 2
  _one_error_line(capsys.readouterr().err, *needles)


def test_help_lists_every_flag(capsys):
  assert cli.invoke(demo.main, demo.FLAGS, ["demo", "--help"]) == 0
  out = capsys.readouterr().out
  assert "--out:" in out and "--frames:" in out and "demo corpus" in out


def test_python_m_generate_exit_code_and_quiet_stderr(files):
  """The real command: exit 2, one line, no absl/jax INFO noise (e.g. no libtpu message)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "vita_jax.generate", f"--model={files['model']}",
                        "--prompt=hi", f"--image={files['root'] / 'not_an_image.png'}"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert run.returncode == 2
  _one_error_line(run.stderr, "not_an_image.png")
