"""Long-VITA in JAX/Flax: a vision-language model for images, long videos and text up to 1M
tokens, with ring attention over a sequence mesh axis.

    model = vita_jax.load_pretrained("path/to/hf_dir", dtype="float32")
    logits = model(input_ids, pixel_values=pixel_values)        # [B, S, V]
    vita_jax.save_pretrained(model, "out_dir", layout="long_vita")
"""

import os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimised scheduler may order independent collectives differently on
# different (fake) CPU devices; with the ring's ppermutes next to GSPMD's gradient all-reduces
# the devices then wait on each other until the 40 s rendezvous timeout aborts the process
# (seen in the trainer on a data=2 x seq=4 mesh). This flag only affects the CPU backend and
# must be in XLA_FLAGS before that backend starts; an explicit user setting wins.
_CPU_ORDER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _CPU_ORDER_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_CPU_ORDER_FLAG}=false").strip()


def load_pretrained(path, dtype="float32", **kwargs):
  """Load a Hugging Face directory (`long_vita` or `internvl` layout) as a Flax model."""
  from vita_jax.checkpoints.hf import load_pretrained as _load
  return _load(path, dtype=dtype, **kwargs)


def save_pretrained(model, path, layout="long_vita", **kwargs):
  """Write `model` as a Hugging Face directory in `layout` (`long_vita` or `internvl`)."""
  from vita_jax.checkpoints.hf import save_pretrained as _save
  return _save(model, path, layout=layout, **kwargs)
