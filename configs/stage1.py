"""Stage 1 — vision-language alignment: only the projector trains.

    python -m vita_jax.train --config=configs/stage1.py:tiny --workdir=runs/stage1

Starts from a pretrained LLM and vision tower that were never joined
(`--config.init_from_llm=QWEN_DIR --config.init_from_vision=INTERNVIT_DIR`; at tiny size they
are random). Sequences of 32,768 tokens (1,024 at tiny), per-sample positions and masking,
LR 1e-3 -> 1e-5. Writes `metrics.jsonl` with a falling `loss` and checkpoints under
`runs/stage1/checkpoints/`; the vision tower and LLM stay bit-identical.
"""

from configs import base


def get_config(arg=None):
  return base.stage_config(
      stage=1, size=base.parse_size(arg), seq_len=32_768, trainable=("projector",),
      peak_lr=1e-3, min_lr=1e-5, max_frames=128, reset_positions=True,
      global_batch=64, steps=8_000, init_from=None,
      mixture={"LLaVA-ReCap": 0.35, "ALLaVA-4V": 0.2, "ShareGPT4V": 0.15, "Docmatix": 0.15,
               "LLaVA-OneVision-Mid": 0.15})
