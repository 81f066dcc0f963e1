"""The files of a Hugging Face checkpoint directory, read without a framework: config.json and
the safetensors shards, lazily, tensor by tensor.

    tensors = SafetensorsDir("hf_dir")                  # {key: np.ndarray}
    tensors = SafetensorsDir("hf_dir", framework="pt")  # {key: torch.Tensor}

vita_jax and vita_torch both read checkpoints through `SafetensorsDir`, so both follow
`model.safetensors.index.json` and report a truncated shard the same way. safetensors imports
torch only when asked for "pt" tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from safetensors import SafetensorError, safe_open

from vita_jax.errors import InputError
from vita_jax.spec.hf_mapping import canonical_key

INDEX = "model.safetensors.index.json"


def read_hf_config(path: str) -> dict:
  """The config.json of HF directory `path` as a dict."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise InputError(f"{file} is not valid JSON ({e}); copy or download it again") from e


def _open(file: str, framework: str):
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} is missing: {INDEX} lists tensors in it; copy or download "
                            "the whole checkpoint directory")
  try:
    return safe_open(file, framework=framework)
  except SafetensorError as e:
    raise InputError(f"{file} is incomplete or damaged ({e}); download or copy this file "
                     "again") from e


class SafetensorsDir(Mapping):
  """Lazy read-only {key: tensor} over a directory's safetensors (sharded or not).

  With an index file, the index says which shard holds each key and a shard is opened on its
  first use; without one, every `*.safetensors` file is opened to list its keys. With `layout`,
  keys are given in the in-memory form of that layout (`canonical_key`). `framework` is
  safetensors' ("numpy", "pt", ...): the type of the tensors returned.
  """

  def __init__(self, path: str, layout: str | None = None, *, framework: str = "numpy"):
    self._framework = framework
    self._handles = {}
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        self._file_of = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files (nor {INDEX}); "
                                "PyTorch .bin checkpoints are not supported: re-save them")
      self._file_of = {}
      for name in files:
        file = os.path.join(path, name)
        self._file_of.update({k: file for k in self._open(file).keys()})
    if layout is not None:
      self._disk = {canonical_key(k, layout): k for k in self._file_of}
    else:
      self._disk = {k: k for k in self._file_of}

  def _open(self, file: str):
    if file not in self._handles:
      self._handles[file] = _open(file, self._framework)
    return self._handles[file]

  def _handle(self, key):
    return self._open(self._file_of[self._disk[key]])

  def __getitem__(self, key):
    return self._handle(key).get_tensor(self._disk[key])

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self._handle(key).get_slice(self._disk[key]).get_shape())

  def dtype(self, key) -> str:
    return self._handle(key).get_slice(self._disk[key]).get_dtype()

  def __iter__(self):
    return iter(self._disk)

  def __len__(self):
    return len(self._disk)
