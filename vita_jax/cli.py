"""Shared command-line plumbing: `--config=FILE[:size]` with `--config.a.b=v` overrides.

    _CONFIG = cli.define_config_flag()
    def main(argv): config = _CONFIG.value ...
    if __name__ == "__main__": cli.run(main)

`run` refuses unknown override keys with a sentence listing the keys that exist, and turns a
user's mistake raised anywhere in `main` (a `UserError`, a missing or unreadable file) into a
one-line message and exit code 2, with absl's and JAX's INFO logging silenced. Every command of
both frameworks starts through it, so they all fail the same way.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app
from ml_collections import config_flags

from vita_jax.errors import ConfigError, UserError


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


# What a user can fix: wrong values, missing or unreadable files. Anything else is our bug and
# keeps its traceback.
USER_MISTAKES = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                 PermissionError)


def _message(error: Exception) -> str:
  if isinstance(error, OSError) and error.filename is not None:    # "[Errno 2] ..." -> plain
    return f"{error.strerror}: {error.filename!r}"
  return str(error)


def _fail(error: Exception) -> None:
  print(f"error: {_message(error)}", file=sys.stderr)
  sys.exit(2)


def _quiet_logs(argv: Sequence[str]) -> None:
  """Library INFO logs off (orbax and jax log at INFO through absl; users see warnings and
  errors only). `--verbosity=0` on the command line brings them back."""
  from absl import logging
  if not any(a.startswith(("--verbosity", "-v=")) for a in argv):
    logging.set_verbosity(logging.WARNING)


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None, *,
        flag_values=None) -> None:
  """Run a command's `main(argv)` and exit.

  By default the command's flags are absl's global ones and `app.run` parses them (the commands
  with `--config`, serve, the evaluations). Commands that tests run in process side by side
  (generate, convert, verify, vita_torch.generate, the data tools) keep theirs in their own
  `flags.FlagValues` (`flag_values`) and run through `invoke`: in the global set their names
  would clash (`--dtype` means different things to convert and verify).
  """
  argv = list(sys.argv if argv is None else argv)
  if flag_values is not None:
    sys.exit(invoke(main, flag_values, argv))
  try:
    check_overrides(argv)
  except ConfigError as e:
    _fail(e)

  def guarded(args):
    try:
      return main(args)
    except USER_MISTAKES as e:                      # a user's mistake: no traceback
      _fail(e)

  def parse(args):
    rest = app.parse_flags_with_usage(args)
    _quiet_logs(args)
    return rest

  app.run(guarded, argv=argv, flags_parser=parse)


def _flag_help(flag_values) -> str:
  lines = []
  for name in sorted(flag_values.flag_values_dict()):
    flag = flag_values[name]
    if name != flag.name or name == "undefok":     # short aliases; absl's own
      continue
    if flag.default is None:
      default = "required" if flag.validators else "default: unset"
    else:
      default = f"default: {flag.default_as_str}"
    lines.append(f"  --{name}: {flag.help} ({default})")
  return "\n".join(lines)


def invoke(main: Callable[[list[str]], int | None], flag_values, argv: Sequence[str]) -> int:
  """Parse `argv` (argv[0] is the program) into `flag_values`, run `main(positional argv)` and
  return the exit code: main's return value (None is 0), 2 after a user's mistake (one line on
  stderr), 0 after `--help`. The in-process twin of `python -m <command>`."""
  from absl import flags
  argv = list(argv)
  if any(a in ("--help", "-h", "--helpfull", "-?", "--helpshort") for a in argv[1:]):
    module = sys.modules.get(main.__module__)
    print((module.__doc__ or "").strip() + "\n\nflags:\n" + _flag_help(flag_values))
    return 0
  flag_values.unparse_flags()
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    print(f"error: {e}; see --help", file=sys.stderr)
    return 2
  if not flags.FLAGS.is_parsed():                   # absl logging wants the global set parsed
    flags.FLAGS.mark_as_parsed()
  _quiet_logs(argv)
  try:
    code = main(rest)
  except USER_MISTAKES as e:
    print(f"error: {_message(e)}", file=sys.stderr)
    return 2
  return int(code or 0)
