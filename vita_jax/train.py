"""Trainer entry point: `python -m vita_jax.train --config=configs/stage2.py:tiny --workdir=DIR`.

Not implemented yet (issue: the trainer). Today this validates the config against the local
devices — so a wrong override is refused with a clear message — and then says so plainly.
"""

import sys

import jax
from absl import flags

from vita_jax import cli
from vita_jax import config as config_lib

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl).")


def main(argv):
  del argv
  config = _CONFIG.value
  shape = config_lib.validate(config, jax.device_count())
  print(f"config ok: stage {config.stage}, size {config.model.size}, mesh {shape}")
  print("error: the trainer is not implemented yet; see the open trainer issue.", file=sys.stderr)
  sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
