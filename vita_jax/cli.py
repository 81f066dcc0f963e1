"""Shared command-line plumbing: `--config=FILE[:size]` with `--config.a.b=v` overrides.

    _CONFIG = cli.define_config_flag()
    def main(argv): config = _CONFIG.value ...
    if __name__ == "__main__": cli.run(main)

`run` refuses unknown override keys with a sentence listing the keys that exist, and turns a
`ConfigError` raised anywhere in `main` into a one-line message and exit code 2.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app
from ml_collections import config_flags

from vita_jax.errors import ConfigError


def define_config_flag(name: str = "config", required: bool = True):
  """The `--config` flag; idempotent, so modules that each define it can be imported together
  (tests import the trainer and the planner in one process)."""
  from absl import flags
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  holder = config_flags.DEFINE_config_file(
      name, None, "Experiment config: configs/stageN.py[:tiny|small|14b]. Override any field "
      "with --config.a.b=value.", lock_config=True)
  if required:
    flags.mark_flag_as_required(name)
  return holder


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Load `path[:arg]` the way config_flags does (used to check overrides before parsing)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_vita_config", path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f"config file {path!r} not found; pass e.g. --config=configs/stage2.py:tiny")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except FileNotFoundError as e:
    raise ConfigError(f"config file {path!r} not found; pass e.g. "
                      "--config=configs/stage2.py:tiny") from e
  return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv: Sequence[str], flag: str = "config") -> None:
  """Raise ConfigError for a `--config.x.y` whose key the config does not have."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")), None)
  if spec is None:
    return
  try:
    config = load_config_file(spec)
  except ValueError as e:  # bad size etc.: the config file's own message
    raise ConfigError(str(e)) from e
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].split("=", 1)[0]
    node, walked = config, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(walked) or "the top level"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(
            f"unknown config key {flag}.{key}: {part!r} is not a field of {where}"
            + (f" (fields there: {', '.join(known)})" if known else ""))
      node, walked = node[part], walked + [part]


def _fail(error: Exception) -> None:
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  try:
    check_overrides(argv)
  except ConfigError as e:
    _fail(e)

  def guarded(args):
    try:
      return main(args)
    except (ConfigError, FileNotFoundError) as e:   # a user's mistake: no traceback
      _fail(e)

  app.run(guarded, argv=argv)
