"""Needle in a video haystack: N generated frames, one of them different; the model is asked
what the odd frame shows. Accuracy over (frames x depth), printed and drawn as a PNG heatmap.

    python -m vita_jax.eval.needle --model=runs/demo --frames=16,64,256,1024 \
        --depths=0,0.25,0.5,0.75,1.0 --seq_shards=8 --out=runs/demo/needle.png

Videos come from `vita_jax.data.demo.make_needle_video` (grey frames with a white dot; the
needle is a coloured shape). An answer counts as right when it names the needle's colour and
shape (`--samples` videos per cell, different seeds).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from vita_jax import generate as gen


def is_correct(answer: str, truth: str) -> bool:
  """truth is "a {colour} {shape}": both words must appear in the answer."""
  words = answer.lower().replace(".", " ").split()
  return all(w in words for w in truth.split()[1:])


def run_cell(model, tok, num_frames: int, depth: float, samples: int, *, seq_shards: int,
             max_new_tokens: int = 8, seed: int = 0) -> tuple[float, list[tuple[str, str]]]:
  """(accuracy, [(answer, truth)]) over `samples` needle videos of one (frames, depth) cell."""
  from vita_jax.data.demo import NEEDLE_QUESTION, make_needle_video
  eos = int(model.config.tokens.eos_id)
  results = []
  for k in range(samples):
    frames, truth = make_needle_video(num_frames, depth, seed + 1000 * k + num_frames)
    ids, pixels = gen.build_prompt(model, tok, f"<video>\n{NEEDLE_QUESTION}", frames=frames)
    out = gen.generate(model, ids, pixels, max_new_tokens=max_new_tokens, seq_shards=seq_shards,
                       eos_id=eos)
    answer = tok.decode([t for t in out[0] if t != eos], skip_special_tokens=True).strip()
    results.append((answer, truth))
  return float(np.mean([is_correct(a, t) for a, t in results])), results


def format_table(frames, depths, acc: np.ndarray) -> str:
  head = "frames \\ depth " + "".join(f"{d:>7.2f}" for d in depths)
  rows = [f"{n:>14d} " + "".join(f"{a:>7.2f}" for a in acc[i]) for i, n in enumerate(frames)]
  return "\n".join([head] + rows)


def heatmap(frames, depths, acc: np.ndarray, path: str, cell: int = 56) -> None:
  """Accuracy grid as a PNG: rows = frames, columns = depth; red 0 -> green 1, values written."""
  from PIL import Image, ImageDraw
  left, top = 70, 30
  width = max(left + cell * len(depths) + 10, 330)
  img = Image.new("RGB", (width, top + cell * len(frames) + 30), "white")
  draw = ImageDraw.Draw(img)
  draw.text((left, 8), "needle accuracy (rows: frames, columns: depth)", fill="black")
  for j, d in enumerate(depths):
    draw.text((left + j * cell + 14, top + cell * len(frames) + 8), f"{d:.2f}", fill="black")
  for i, n in enumerate(frames):
    draw.text((8, top + i * cell + cell // 2 - 6), str(n), fill="black")
    for j in range(len(depths)):
      a = float(acc[i, j])
      colour = (int(230 * (1 - a)) + 20, int(200 * a) + 30, 50)
      box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2)
      draw.rectangle(box, fill=colour)
      draw.text((box[0] + 14, box[1] + cell // 2 - 6), f"{a:.2f}", fill="white")
  img.save(path)


def main(argv):
  from absl import flags
  f = flags.FLAGS
  frames = [int(x) for x in f.frames.split(",") if x]
  depths = [float(x) for x in f.depths.split(",") if x]
  bad = [d for d in depths if not 0.0 <= d <= 1.0]
  if bad:
    raise gen.ConfigError(f"--depths must lie in [0, 1]; got {bad}")
  model, tok = gen.load_for_inference(f.model, tokenizer=f.tokenizer)
  acc = np.zeros((len(frames), len(depths)))
  for i, n in enumerate(frames):
    for j, d in enumerate(depths):
      t0 = time.perf_counter()
      acc[i, j], results = run_cell(model, tok, n, d, f.samples, seq_shards=f.seq_shards)
      print(f"frames={n:5d} depth={d:.2f} acc={acc[i, j]:.2f} ({time.perf_counter() - t0:.1f} s)"
            f" e.g. {results[0][0]!r} for {results[0][1]!r}", flush=True)
  print(format_table(frames, depths, acc))
  print(f"mean accuracy {acc.mean():.3f}")
  out = f.out or "needle.png"
  heatmap(frames, depths, acc, out)
  print(f"heatmap written to {out}", file=sys.stderr)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("model", None, "training workdir or Hugging Face directory", required=True)
  flags.DEFINE_string("frames", "16,64,256,1024", "comma-separated video lengths")
  flags.DEFINE_string("depths", "0,0.25,0.5,0.75,1.0", "needle positions as fractions")
  flags.DEFINE_integer("samples", 4, "videos per (frames, depth) cell")
  flags.DEFINE_integer("seq_shards", 1, "devices the prompt is sharded over")
  flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the model's)")
  flags.DEFINE_string("out", "", "heatmap PNG path (default: needle.png)")


if __name__ == "__main__":
  from vita_jax import cli
  _define_flags()
  cli.run(main)
