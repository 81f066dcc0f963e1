"""Stage 3 — long-sequence fine-tune to 128K tokens: LLM + projector train.

    python -m vita_jax.train --config=configs/stage3.py:tiny --workdir=runs/stage3

Sequences of 131,072 tokens (1,024 at tiny), positions keep running across packed samples and
attention crosses sample boundaries; 512 frames per video; LR 5e-6 -> 1e-7. Needs `seq` mesh
shards at 14b (e.g. `--config.mesh.seq=8`); see `python -m vita_jax.plan`.
"""

from configs import base


def get_config(arg=None):
  size = base.parse_size(arg)
  return base.stage_config(
      stage=3, size=size, seq_len=131_072, trainable=("projector", "llm"),
      peak_lr=5e-6 if size == "14b" else 5e-4, min_lr=1e-7 if size == "14b" else 1e-5,
      max_frames=512, reset_positions=False, global_batch=8, steps=2_000,
      init_from=None if size != "14b" else "runs/stage2",
      mixture={"LLaVA-Video-178K": 0.3, "MovieNet-Summary": 0.1, "LongWriter": 0.1,
               "LongAlpaca": 0.1, "LLaVA-OneVision": 0.2, "OpenHermes-2.5": 0.2})
