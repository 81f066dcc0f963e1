"""Stage 4 — long-sequence fine-tune to 1M tokens: LLM + projector train.

    python -m vita_jax.train --config=configs/stage4.py:tiny --workdir=runs/stage4

Sequences of 1,048,576 tokens (1,024 at tiny), running positions, 4,096 frames per video,
LR 5e-6 -> 1e-7. At 14b plan the mesh first: `python -m vita_jax.plan --config=configs/stage4.py`.
"""

from configs import base


def get_config(arg=None):
  size = base.parse_size(arg)
  return base.stage_config(
      stage=4, size=size, seq_len=1_048_576, trainable=("projector", "llm"),
      peak_lr=5e-6 if size == "14b" else 5e-4, min_lr=1e-7 if size == "14b" else 1e-5,
      max_frames=4096, reset_positions=False, global_batch=1, steps=500,
      init_from=None if size != "14b" else "runs/stage3",
      mixture={"LLaVA-Video-178K": 0.3, "MovieNet-Summary": 0.2, "LongWriter": 0.1,
               "LongAlpaca": 0.1, "LLaVA-OneVision": 0.15, "OpenHermes-2.5": 0.15})
