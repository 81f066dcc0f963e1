"""Stage 2 — general knowledge: everything trains (ViT LR x0.1, layer decay 0.9).

    python -m vita_jax.train --config=configs/stage2.py:demo --workdir=runs/demo_stage2

`:demo` is the first step of `make train` (docs/demo.md): the tiny model on the demo corpus
(generated on first use), its randomly initialised ViT at the full LR; the loss falls within
a few minutes on 2 CPU cores. `:tiny` is the same with the release's ViT LR x0.1.
At 14b: sequences of 16,384 tokens, per-sample positions and masking, LR 1e-5 -> 1e-7,
64 frames per video, `--config.init_from=<stage-1 workdir>`.
"""

from configs import base

DEMO_STEPS = 800


def get_config(arg=None):
  size, demo = base.parse_recipe(arg)
  config = base.stage_config(
      stage=2, size=size, seq_len=16_384, trainable=("vision", "projector", "llm"),
      peak_lr=1e-5 if size == "14b" else 1e-3, min_lr=1e-7 if size == "14b" else 1e-5,
      max_frames=64, reset_positions=True, global_batch=64, steps=20_000,
      init_from=None if size != "14b" else "runs/stage1",
      # The release's ViT LR x0.1 protects a pretrained tower; the demo's starts random and
      # must learn the needle's shapes here (stage 3 freezes it), so it trains at the full LR.
      vision_lr_mult=1.0 if demo else 0.1, layer_decay=0.9,
      mixture={"LLaVA-OneVision": 0.25, "the_cauldron": 0.15, "M4-Instruct": 0.1,
               "LVIS-Instruct4V": 0.05, "ALLaVA-4V": 0.05, "Docmatix": 0.05,
               "ShareGPT4Video": 0.05, "LLaVA-Video-178K": 0.1, "VideoChatGPT-Plus": 0.05,
               "MetaMathQA": 0.05, "OpenHermes-2.5": 0.1})
  if demo:
    # The random ViT needs the steps to tell the four shapes apart (shape accuracy on fresh
    # images: 0.46 after 300 steps, 0.71 after 600, 0.92 after 800 on the v3 corpus; colour is
    # right by 300).
    config.train.steps = DEMO_STEPS
  return config
