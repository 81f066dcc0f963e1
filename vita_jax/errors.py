"""The errors a user can fix. Every command prints them as one line and exits with code 2.

This module imports nothing, so the framework-free layers (`spec/`, `data/`) and the PyTorch
mirror can raise and catch them without loading JAX.
"""


class UserError(ValueError):
  """A mistake in what the user gave (a value, a file, a flag); the message names the fix."""


class ConfigError(UserError):
  """A config value or flag that cannot work; the message names the value and the fix."""


class InputError(UserError):
  """An input file or request that cannot be used (a corrupt image, a too-long prompt)."""
