"""PyTorch mirror of the Long-VITA model for NPU (torch_npu) and GPU, sharing configs and
checkpoints with vita_jax. `torch_npu` is only imported behind a guard (see device.py).

    model = vita_torch.load_pretrained("hf_dir", dtype=torch.bfloat16, device="auto")
    logits = model(input_ids, pixel_values=pixel_values)      # [B, S, V]; pixels NCHW
"""

from __future__ import annotations

import torch


def load_pretrained(path: str, dtype=torch.float32, device="auto", tokenizer: str = ""):
  """Load an HF directory of either layout (docs/design.md#contracts) as an eval-mode
  `LongVITAForCausalLM`."""
  from vita_torch.device import resolve_device
  from vita_torch.io import read_checkpoint
  from vita_torch.model import LongVITAForCausalLM

  if isinstance(dtype, str):
    dtype = getattr(torch, dtype)
  cfg, state = read_checkpoint(path, tokenizer)
  with torch.device("meta"):
    model = LongVITAForCausalLM(cfg)
  state = {k: v for k, v in state.items()
           if not (k == "lm_head.weight" and cfg.llm.tie_embeddings)}
  missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
  if missing or unexpected:
    raise ValueError(f"checkpoint {path!r} does not match the model: missing {missing[:5]}, "
                     f"unexpected {unexpected[:5]}")
  return model.to(device=resolve_device(device), dtype=dtype).eval()
