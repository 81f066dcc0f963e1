"""Convert checkpoints: between the `long_vita` and `internvl` HF layouts, and from a
training workdir (orbax) to either.

    python -m vita_jax.convert SRC DST [--layout=internvl|long_vita] [--dtype=bfloat16]
        [--max_shard_gb=4]

SRC is an HF directory (its layout comes from its config.json; --layout defaults to the other
one) or a `vita_jax.train` workdir (its newest checkpoint; --layout defaults to long_vita).
--dtype defaults to the dtype SRC is stored in (float32 for a workdir). The conversion is exact
(a table of names, transposes and reshapes; a bias-free projector gets zero biases in the
internvl layout). The other direction needs no conversion: `--config.init_from=HF_DIR`.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from vita_jax.errors import ConfigError

# Flags live in this command's own FlagValues (see vita_jax.cli.run).
FLAGS = flags.FlagValues()
flags.DEFINE_enum("layout", None, ["long_vita", "internvl"],
                  "layout to write (default: the one SRC is not in)", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "tensor dtype to write (default: SRC's)", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", "", "tokenizer directory to ship with DST (default: the run's "
                    "or SRC's own)", flag_values=FLAGS)
flags.DEFINE_float("max_shard_gb", 4.0, "largest safetensors shard in GiB", flag_values=FLAGS)


def _stored_dtype(src: str, layout: str) -> str:
  from vita_jax.checkpoints.hf import SafetensorsDir
  tensors = SafetensorsDir(src, layout)
  key = next(iter(tensors))
  return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(tensors.dtype(key),
                                                                     "float32")


# The files of a Hugging Face tokenizer (fast or slow, Qwen's tiktoken, chat templates).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "qwen.tiktoken", "chat_template.json",
                   "chat_template.jinja", "generation_config.json")


def _copy_tokenizer(tokenizer_dir: str, dst: str) -> None:
  """The tokenizer files go with the weights, so DST is a complete model directory (the
  readers check the special-token ids against it)."""
  import shutil
  found = [n for n in TOKENIZER_FILES if tokenizer_dir and
           os.path.isfile(os.path.join(tokenizer_dir, n))]
  if not found:
    print(f"note: no tokenizer files in {tokenizer_dir!r}; pass --tokenizer=DIR when using {dst}",
          file=sys.stderr)
    return
  for name in found:
    shutil.copy(os.path.join(tokenizer_dir, name), dst)


def convert(src: str, dst: str, layout: str | None = None, dtype: str | None = None,
            max_shard_bytes: int = 4 << 30, tokenizer: str = "") -> str:
  """Read SRC (either layout) and write DST in `layout` with its tokenizer files (from
  `tokenizer`, else the run's or SRC's own); returns the layout written."""
  from vita_jax.checkpoints.hf import (
    LAYOUTS,
    detect_layout,
    load_pretrained,
    read_hf_config,
    save_pretrained,
  )
  from vita_jax.checkpoints.workdir import is_workdir, load_model_from_workdir
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ConfigError(f"SRC and DST are the same directory ({src}); write to a new directory")
  if is_workdir(src):
    layout, dtype = layout or "long_vita", dtype or "float32"
    model, config = load_model_from_workdir(src)
    save_pretrained(model, dst, layout=layout, dtype=dtype, max_shard_bytes=max_shard_bytes)
    _copy_tokenizer(tokenizer or config.data.get("tokenizer", ""), dst)
    return layout
  src_layout = detect_layout(read_hf_config(src))
  layout = layout or next(x for x in LAYOUTS if x != src_layout)
  dtype = dtype or _stored_dtype(src, src_layout)
  model = load_pretrained(src, dtype=dtype, tokenizer=tokenizer)
  save_pretrained(model, dst, layout=layout, dtype=dtype, max_shard_bytes=max_shard_bytes)
  _copy_tokenizer(tokenizer or src, dst)
  return layout


def main(argv) -> None:

  f = FLAGS
  if len(argv) != 3:
    raise ConfigError(f"expected SRC and DST, got {argv[1:]}; usage: python -m vita_jax.convert "
                      "SRC DST [--layout=internvl|long_vita] [--dtype=bfloat16]")
  src, dst = argv[1:]
  layout = convert(src, dst, f.layout, f.dtype, int(f.max_shard_gb * (1 << 30)), f.tokenizer)
  print(f"wrote {dst} ({layout} layout)")


if __name__ == "__main__":
  from vita_jax import cli
  cli.run(main, flag_values=FLAGS)
