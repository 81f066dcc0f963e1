"""Convert LLaVA / ShareGPT-style JSON to our JSONL manifest.

    python -m vita_jax.data.llava_convert --input llava_v1_5_mix665k.json \
        --image_root /data/llava/images --out data/LLaVA-665K/train.jsonl

Input: a JSON list (or JSON Lines) of {"id", "image": path | [paths], "video": path,
"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}. Output: one
{"id", "messages", "images", "videos"} per line with media paths rewritten relative to the
output file, as the pipeline expects. Unreadable entries are reported and left out; missing
media files are only counted (the pipeline skips them with a warning).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}

# Flags live in this command's own FlagValues (see vita_jax.cli.run).
FLAGS = flags.FlagValues()
flags.DEFINE_string("input", None, "LLaVA/ShareGPT .json or .jsonl", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "output manifest, e.g. data/NAME/train.jsonl", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("image_root", None, "folder the input's image/video paths are relative to "
                    "(default: the input file's folder)", flag_values=FLAGS)


def _paths(value) -> list[str]:
  if not value:
    return []
  return [value] if isinstance(value, str) else list(value)


def convert_record(raw: dict, media_root: str, out_dir: str) -> dict:
  """One LLaVA entry -> one manifest sample (raises ValueError when unreadable)."""
  messages = []
  for turn in raw.get("conversations") or []:
    role = _ROLES.get(str(turn.get("from", "")).lower())
    if role is None or not isinstance(turn.get("value"), str):
      raise ValueError(f"turn from={turn.get('from')!r} is not human/gpt/system with a value")
    messages.append({"role": role, "content": turn["value"]})
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError("no gpt/assistant turn")

  def rel(p):
    return os.path.relpath(os.path.join(media_root, p), out_dir)

  out = {"id": str(raw.get("id", "")), "messages": messages}
  images = [rel(p) for p in _paths(raw.get("image", raw.get("images")))]
  videos = [rel(p) for p in _paths(raw.get("video", raw.get("videos")))]
  if images:
    out["images"] = images
  if videos:
    out["videos"] = videos
  return out


def _read(path: str) -> list:
  with open(path) as f:
    text = f.read()
  if text.lstrip().startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def convert(input_path: str, out_path: str, media_root: str | None = None) -> dict:
  """Write the manifest; returns counts {"written", "unreadable", "missing_media"}."""
  media_root = media_root or os.path.dirname(os.path.abspath(input_path))
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  counts = {"written": 0, "unreadable": 0, "missing_media": 0}
  with open(out_path, "w") as f:
    for i, raw in enumerate(_read(input_path)):
      try:
        sample = convert_record(raw, media_root, out_dir)
      except (ValueError, AttributeError, TypeError) as e:
        counts["unreadable"] += 1
        print(f"warning: {input_path} entry {i}: {e}; left out", file=sys.stderr)
        continue
      for p in sample.get("images", []) + sample.get("videos", []):
        if not os.path.exists(os.path.join(out_dir, p)):
          counts["missing_media"] += 1
      f.write(json.dumps(sample, ensure_ascii=False) + "\n")
      counts["written"] += 1
  return counts


def main(argv) -> None:
  f = FLAGS
  counts = convert(f.input, f.out, f.image_root)
  print(f"wrote {counts['written']} samples to {f.out} ({counts['unreadable']} unreadable "
        f"entries left out, {counts['missing_media']} media paths not found)")


if __name__ == "__main__":
  from vita_jax import cli
  cli.run(main, flag_values=FLAGS)
