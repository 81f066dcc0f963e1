"""Manifests: JSON Lines files of samples, and the mixture of them a config names.

One sample a line; paths are relative to the manifest's directory:

    {"id": "s1", "messages": [{"role": "user", "content": "<image>\\nWhat colour?"},
                              {"role": "assistant", "content": "red"}],
     "images": ["img/1.png"], "videos": ["vid/1.mp4" or "vid/1/" (a folder of frames)]}

LLaVA's form (`conversations` with `from: human|gpt|system`, `value`, `image` as one path or a
list, `video`) is read too. `config.data.manifest` (comma-separated files) overrides
`config.data.mixture` ("name=weight,..."; each name is `<data_root>/<name>/*.jsonl`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

from vita_jax.data.conversation import SampleError
from vita_jax.errors import ConfigError

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


@dataclasses.dataclass
class Source:
  name: str
  files: list
  weight: float


class JsonlSource:
  """Random access to the lines of JSONL files (a grain data source); line offsets indexed once.

  Item i -> {"text", "file", "line" (1-based), "source"}. Blank lines are not samples.
  """

  def __init__(self, name: str, files: list[str]):
    self.name, self.files = name, list(files)
    file_ids, lines, offsets = [], [], []
    for f, path in enumerate(self.files):
      with open(path, "rb") as fh:
        offset = 0
        for n, raw in enumerate(fh, start=1):
          if raw.strip():
            file_ids.append(f)
            lines.append(n)
            offsets.append(offset)
          offset += len(raw)
    self._file = np.asarray(file_ids, np.int32)
    self._line = np.asarray(lines, np.int64)
    self._offset = np.asarray(offsets, np.int64)

  def __len__(self) -> int:
    return len(self._offset)

  def __getitem__(self, i: int) -> dict:
    path = self.files[int(self._file[i])]
    with open(path, "rb") as fh:
      fh.seek(int(self._offset[i]))
      text = fh.readline().decode("utf-8", errors="replace")
    return {"text": text, "file": path, "line": int(self._line[i]), "source": self.name}


def parse_sample(text: str) -> dict:
  """One manifest line -> {"id", "messages", "images", "videos"} (paths as written)."""
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise SampleError("malformed_json", f"not valid JSON ({e.msg} at column {e.colno})") from e
  if not isinstance(raw, dict):
    raise SampleError("malformed_json", "a line must be a JSON object")
  if "messages" in raw:
    messages = raw["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages):
      raise SampleError("bad_sample", "`messages` must be a list of {role, content} strings")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
  elif "conversations" in raw:
    messages = []
    for turn in raw["conversations"]:
      role = _LLAVA_ROLES.get(str(turn.get("from", "")).lower())
      if role is None or not isinstance(turn.get("value"), str):
        raise SampleError("bad_sample", f"LLaVA turn with from={turn.get('from')!r} unreadable")
      messages.append({"role": role, "content": turn["value"]})
  else:
    raise SampleError("bad_sample", "sample has neither `messages` nor `conversations`")
  if not any(m["role"] == "assistant" for m in messages):
    raise SampleError("bad_sample", "sample has no assistant turn (nothing to learn)")
  images = raw.get("images", raw.get("image", []))
  videos = raw.get("videos", raw.get("video", []))
  images = [images] if isinstance(images, str) else list(images or [])
  videos = [videos] if isinstance(videos, str) else list(videos or [])
  return {"id": str(raw.get("id", "")), "messages": messages, "images": images,
          "videos": videos}


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, weight = part.partition("=")
    try:
      w = float(weight) if sep else 1.0
    except ValueError:
      w = -1.0
    if not name or w <= 0:
      raise ConfigError(f"data.mixture entry {part!r} is not name=positive_weight "
                        "(e.g. --config.data.mixture=demo=1.0)")
    out.append((name.strip(), w))
  return out


def resolve_sources(data_cfg, split: str = "train") -> list[Source]:
  """The manifests to read: the user's manifest(s), or the mixture under data_root."""
  manifest = data_cfg.eval_manifest if split == "eval" else data_cfg.manifest
  if split == "eval" and not manifest:
    raise ConfigError("no eval data: set --config.data.eval_manifest=FILE.jsonl")
  if manifest:
    files = [f.strip() for f in manifest.split(",") if f.strip()]
    for f in files:
      if not os.path.isfile(f):
        raise ConfigError(f"manifest {f!r} not found; --config.data.manifest takes JSONL files")
    return [Source(os.path.splitext(os.path.basename(f))[0], [f], 1.0) for f in files]
  mixture = parse_mixture(data_cfg.mixture)
  if not mixture:
    raise ConfigError("config.data.mixture is empty and no --config.data.manifest was given")
  root = data_cfg.data_root
  found = {n: sorted(glob.glob(os.path.join(root, n, "*.jsonl"))) for n, _ in mixture}
  missing = [n for n, files in found.items() if not files]
  if missing:
    present = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else [])
                     if glob.glob(os.path.join(root, d, "*.jsonl")))
    raise ConfigError(
        f"dataset(s) {', '.join(missing)} not found under data_root {root!r} (each must be "
        f"{root}/<name>/*.jsonl); found: {', '.join(present) or 'none'}. Download/convert them "
        "(python -m vita_jax.data.llava_convert), change --config.data.mixture, or pass "
        "--config.data.manifest=FILE.jsonl")
  return [Source(n, found[n], w) for n, w in mixture]
