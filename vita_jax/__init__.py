"""Long-VITA in JAX/Flax: a vision-language model for images, long videos and text up to 1M
tokens, with ring attention over a sequence mesh axis.

    model = vita_jax.load_pretrained("path/to/hf_dir", dtype="float32")
    logits = model(input_ids, pixel_values=pixel_values)        # [B, S, V]
    vita_jax.save_pretrained(model, "out_dir", layout="long_vita")
"""

__version__ = "0.1.0"


def load_pretrained(path, dtype="float32", **kwargs):
  """Load a Hugging Face directory (`long_vita` or `internvl` layout) as a Flax model."""
  from vita_jax.checkpoint_hf import load_pretrained as _load
  return _load(path, dtype=dtype, **kwargs)


def save_pretrained(model, path, layout="long_vita", **kwargs):
  """Write `model` as a Hugging Face directory in `layout` (`long_vita` or `internvl`)."""
  from vita_jax.checkpoint_hf import save_pretrained as _save
  return _save(model, path, layout=layout, **kwargs)
