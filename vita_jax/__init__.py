"""Long-VITA in JAX/Flax: a vision-language model for images, long videos and text up to 1M
tokens, with ring attention over a sequence mesh axis.

    model = vita_jax.load_pretrained("path/to/hf_dir", dtype="float32")
    logits = model(input_ids, pixel_values=pixel_values)        # [B, S, V]
    vita_jax.save_pretrained(model, "out_dir", layout="long_vita")
"""

import os
import re

__version__ = "0.1.0"

# XLA:CPU runs every (fake) device of a process on one thread pool, sized by default to the
# number of cores. A device waiting in a collective holds a pool thread, and XLA:CPU starts a
# program's collectives in order without waiting for the previous one to finish, so with many
# fake devices on few cores the waiting threads can take the whole pool while the peers they
# wait for have no thread left: the process stops at XLA's rendezvous timeout (seen in training
# on fsdp=4 x seq=2, 2 of 3 runs on 2 cores; 0 of 3 with a larger pool). A pool of 8 threads per
# fake device removes the starvation; it only applies with several host devices and when the
# user has not chosen a size. It must be set before JAX creates its CPU client.
_FAKE_DEVICES = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                          os.environ.get("XLA_FLAGS", ""))
if _FAKE_DEVICES and int(_FAKE_DEVICES.group(1)) > 1 and not (
    os.environ.get("PJRT_NPROC") or os.environ.get("NPROC")):
  os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, 8 * int(_FAKE_DEVICES.group(1))))


def load_pretrained(path, dtype="float32", **kwargs):
  """Load a Hugging Face directory (`long_vita` or `internvl` layout) as a Flax model."""
  from vita_jax.checkpoints.hf import load_pretrained as _load
  return _load(path, dtype=dtype, **kwargs)


def save_pretrained(model, path, layout="long_vita", **kwargs):
  """Write `model` as a Hugging Face directory in `layout` (`long_vita` or `internvl`)."""
  from vita_jax.checkpoints.hf import save_pretrained as _save
  return _save(model, path, layout=layout, **kwargs)
