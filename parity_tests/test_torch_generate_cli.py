"""`python -m vita_torch.generate`: a tiny long_vita checkpoint with a demo tokenizer, an image
of 3 tiles; one process, and 2 gloo processes with --context_parallel (as torchrun would start
them: RANK / WORLD_SIZE / MASTER_* in the environment) print the same answer."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from configs import base
from vita_jax import cli
from vita_jax.spec import tokens as spec_tokens
from vita_torch import generate as gen
from vita_torch import testing
from vita_torch.io import read_checkpoint, save_long_vita


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  from vita_jax.data.tokenizer import train_demo_tokenizer
  root = tmp_path_factory.mktemp("cli")
  internvl, out = str(root / "internvl"), str(root / "model")
  testing.make_internvl_checkpoint(internvl, seed=3)
  cfg, state = read_checkpoint(internvl)
  cfg.layout = "long_vita"
  cfg.tokens = spec_tokens.special_token_ids(spec_tokens.DEMO_FIRST_VISUAL_ID, eos_id=2, pad_id=0)
  cfg.tokens.image_token_id = -1
  save_long_vita(cfg, state, out)
  texts = ["a red square on a blue background", "what colour is the shape?"] * 50
  train_demo_tokenizer(texts, out, vocab_size=300)
  image = np.zeros((56, 112, 3), np.uint8)
  image[:, :56, 0] = 255
  Image.fromarray(image).save(root / "wide.png")          # 2x1 grid -> thumbnail + 2 tiles
  return out, str(root / "wide.png")


def _args(model_dir, image):
  return [f"--model={model_dir}", "--prompt=what colour is the shape?", f"--image={image}",
          "--max_new_tokens=6", "--dtype=float32", "--device=cpu"]


def _worker(rank, world, port, argv):
  torch.set_num_threads(1)
  os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                    WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
  cli.run(gen.main, ["vita_torch.generate", *argv], flag_values=gen.FLAGS)


def _answer(out: str) -> list[str]:
  return [line for line in out.splitlines() if line.strip() and "vita_torch" not in line]


def test_cli_single_and_context_parallel_agree(model_dir, capfd):
  path, image = model_dir
  assert cli.invoke(gen.main, gen.FLAGS, ["vita_torch.generate", *_args(path, image)]) == 0
  single = _answer(capfd.readouterr().out)
  assert len(single) == 2 and "3 prompt tokens" not in single[1]
  assert "6 new" in single[1] and "1 x cpu" in single[1]

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  argv = _args(path, image) + ["--context_parallel"]
  mp.start_processes(_worker, args=(2, port, argv), nprocs=2, start_method="fork")
  parallel = _answer(capfd.readouterr().out)
  assert len(parallel) == 2                               # only rank 0 prints
  assert parallel[0] == single[0]
  assert "2 x cpu" in parallel[1]


def test_prompt_layout(model_dir):
  from vita_jax.data.tokenizer import load_tokenizer
  path, image = model_dir
  tok = load_tokenizer(path)
  cfg, _ = read_checkpoint(path)
  ids, pixels = gen.build_prompt(tok, cfg, "hi", [image])
  assert pixels.shape == (3, 3, 56, 56)                   # NCHW: thumbnail + 2 tiles
  context = torch.isin(ids, torch.tensor([tok.ids["<IMG_CONTEXT>"], tok.ids["<PATCH_CONTEXT>"]]))
  assert int(context.sum()) == 3 * spec_tokens.tokens_per_tile(cfg)
  assert ids[0, 0] == tok.ids["<|im_start|>"] and tok.decode(ids[0, -2:]).endswith("\n")


def test_torch_and_jax_prompts_are_the_same():
  """The torch CLI's builder and vita_jax.generate.build_prompt give the same ids and pixels for
  a prompt with an image and a video (videos first, then images, as encode_conversation does)."""
  import types

  from vita_jax import generate as jax_gen
  from vita_jax.data import demo
  from vita_jax.data.tokenizer import load_tokenizer
  root = demo.ensure_demo_data("runs/demo_data")
  tok = load_tokenizer(os.path.join(root, "tokenizer"))
  cfg = base.model_config("tiny")
  cfg.max_frames = 3
  media = os.path.join(root, "demo", "media")
  image, video = os.path.join(media, "img_00000.png"), os.path.join(media, "vid_00000.mp4")
  ids, pixels = gen.build_prompt(tok, cfg, "what is shown?", [image], [video])
  want_ids, want_pixels = jax_gen.build_prompt(types.SimpleNamespace(config=cfg), tok,
                                               "what is shown?", [image], video, max_frames=3)
  np.testing.assert_array_equal(ids.numpy(), want_ids)
  np.testing.assert_array_equal(pixels.permute(0, 2, 3, 1).numpy(), want_pixels)
  order = list(want_ids[0])
  assert order.index(tok.ids["<vid>"]) < order.index(tok.ids["<img>"])
  assert len(want_pixels) > 3                                  # 3 frames, then the image tiles
