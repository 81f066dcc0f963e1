"""Stage 3 — long-sequence fine-tune to 128K tokens: LLM + projector train.

    python -m vita_jax.train --config=configs/stage3.py:tiny --workdir=runs/stage3

Sequences of 131,072 tokens, positions keep running across packed samples and attention
crosses sample boundaries; 512 frames per video; LR 5e-6 -> 1e-7. Needs `seq` mesh shards at
14b (e.g. `--config.mesh.seq=8`); see `python -m vita_jax.plan`.

`:demo` (the tiny model) is the demo's second step (`make train`, docs/demo.md): initialised
from the stage-2 demo run, it trains on 2,048-token rows with ring attention over `seq` = 2 fake CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`), reading the needle curriculum
(videos of 8, 16, 24 then 32 frames, in that order) mixed with the stage-2 corpus:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m vita_jax.train \\
        --config=configs/stage3.py:demo --workdir=runs/demo --config.init_from=runs/demo_stage2
"""

from configs import base

# The demo recipe (tiny model). Rows are twice stage 2's length so positions cover 128-frame prompts
# (~800 tokens) with room to spare; the tile budget fits two rows of 32-frame videos.
TINY = dict(seq_len=2048, global_batch_size=2, max_frames=32, tiles_per_batch=640,
            mixture="needle=0.5,demo=0.5", ordered_sources="needle", seq=2, steps=240,
            peak_lr=5e-4, min_lr=1e-5, init_from="runs/demo_stage2")


def get_config(arg=None):
  size, demo = base.parse_recipe(arg)
  config = base.stage_config(
      stage=3, size=size, seq_len=131_072, trainable=("projector", "llm"),
      peak_lr=5e-6 if size == "14b" else 5e-4, min_lr=1e-7 if size == "14b" else 1e-5,
      max_frames=512, reset_positions=False, global_batch=8, steps=2_000,
      init_from=None if size != "14b" else "runs/stage2",
      mixture={"LLaVA-Video-178K": 0.3, "MovieNet-Summary": 0.1, "LongWriter": 0.1,
               "LongAlpaca": 0.1, "LLaVA-OneVision": 0.2, "OpenHermes-2.5": 0.2})
  if demo:
    for key in ("seq_len", "global_batch_size", "max_frames", "tiles_per_batch", "mixture",
                "ordered_sources"):
      config.data[key] = TINY[key]
    config.mesh.seq = TINY["seq"]
    config.train.steps = TINY["steps"]
    config.train.peak_lr, config.train.min_lr = TINY["peak_lr"], TINY["min_lr"]
    config.train.checkpoint_every = TINY["steps"]
    config.init_from = TINY["init_from"]
  return config
