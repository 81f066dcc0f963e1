"""Needle in a video haystack: N generated frames, one of them different; the model is asked
what the odd frame shows. Accuracy over (frames x depth), printed and drawn as a PNG heatmap.

    python -m vita_jax.eval.needle --model=runs/demo/stage3 --frames=8,16,32,64,128 \
        --depths=0,0.25,0.5,0.75,1.0 --out=runs/demo/needle.png [--show_answers]

Videos come from `vita_jax.data.demo.make_needle_video` (grey frames with a white dot; the
needle is a coloured shape). An answer counts as right when it names the needle's colour and
shape (`--samples` videos per cell). Seeds come from `demo.eval_needle_seed`, a range the
training data never draws from. Next to the model's per-length accuracy the table gives what
random guessing scores: uniform over the colour x shape vocabulary, computed (1/24) and
measured by scoring random answers through the same `is_correct`.
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


def cell_videos(num_frames: int, depth: float, depth_index: int, samples: int):
  """The cell's needle videos, [(frames, truth)], from evaluation-only seeds."""
  from vita_jax.data.demo import eval_needle_seed, make_needle_video
  return [make_needle_video(num_frames, depth, eval_needle_seed(num_frames, depth_index, k))
          for k in range(samples)]


def run_cell(model, tok, num_frames: int, depth: float, samples: int, *, seq_shards: int,
             max_new_tokens: int = 8, depth_index: int = 0) -> tuple[float, list[tuple[str, str]]]:
  """(accuracy, [(answer, truth)]) over `samples` needle videos of one (frames, depth) cell;
  `depth_index` (the column) keeps the seeds of cells with different depths apart."""
  from vita_jax.data.demo import NEEDLE_QUESTION
  eos = int(model.config.tokens.eos_id)
  results = []
  for frames, truth in cell_videos(num_frames, depth, depth_index, samples):
    ids, pixels = gen.build_prompt(model, tok, f"<video>\n{NEEDLE_QUESTION}", frames=frames)
    out = gen.generate(model, ids, pixels, max_new_tokens=max_new_tokens, seq_shards=seq_shards,
                       eos_id=eos)
    answer = tok.decode([t for t in out[0] if t != eos], skip_special_tokens=True).strip()
    results.append((answer, truth))
  return float(np.mean([is_correct(a, t) for a, t in results])), results


def chance_accuracy() -> float:
  """Uniform guessing over the colour x shape vocabulary is right once in |colours|*|shapes|."""
  from vita_jax.data.demo import COLOURS, SHAPES
  return 1.0 / (len(COLOURS) * len(SHAPES))


def random_guess_accuracy(truths: list[str], guesses: int = 100, seed: int = 0) -> float:
  """Measured chance: `guesses` uniform random "a {colour} {shape}" answers per truth, scored
  with `is_correct` exactly as the model's answers are."""
  from vita_jax.data.demo import COLOURS, SHAPES
  rng = np.random.default_rng(seed)
  colours, shapes = list(COLOURS), list(SHAPES)
  hits = [is_correct(f"a {colours[rng.integers(len(colours))]} {shapes[rng.integers(len(shapes))]}",
                     t) for t in truths for _ in range(guesses)]
  return float(np.mean(hits))


def format_answers(frames, depths, answers) -> str:
  """One line per cell: every answer with its truth and whether it counted."""
  lines = ["answers (frames, depth): answer [truth] ok/x"]
  for i, n in enumerate(frames):
    for j, d in enumerate(depths):
      got = "; ".join(f"{a!r} [{t}] {'ok' if is_correct(a, t) else 'x'}"
                      for a, t in answers[i][j])
      lines.append(f"{n:>5d} {d:.2f}: {got}")
  return "\n".join(lines)


def format_baseline(frames, acc: np.ndarray, measured) -> str:
  """Per length: the model's mean over depths next to random guessing (computed, measured)."""
  lines = [f"{'frames':>6s} {'model':>7s} {'chance':>7s} {'random':>7s}"]
  for i, n in enumerate(frames):
    lines.append(f"{n:>6d} {acc[i].mean():>7.3f} {chance_accuracy():>7.3f} {measured[i]:>7.3f}")
  return "\n".join(lines)


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
  answers = [[None] * len(depths) for _ in frames]
  for i, n in enumerate(frames):
    for j, d in enumerate(depths):
      t0 = time.perf_counter()
      acc[i, j], answers[i][j] = run_cell(model, tok, n, d, f.samples, seq_shards=f.seq_shards,
                                          depth_index=j)
      print(f"frames={n:5d} depth={d:.2f} acc={acc[i, j]:.2f} ({time.perf_counter() - t0:.1f} s)"
            f" e.g. {answers[i][j][0][0]!r} for {answers[i][j][0][1]!r}", flush=True)
  print(format_table(frames, depths, acc))
  print(f"mean accuracy {acc.mean():.3f}")
  measured = [random_guess_accuracy([t for cell in row for _, t in cell], seed=i)
              for i, row in enumerate(answers)]
  print("per length, mean over depths, against random guessing (chance = 1/(colours x shapes);"
        " random = uniform guesses scored by is_correct):")
  print(format_baseline(frames, acc, measured))
  if f.show_answers:
    print(format_answers(frames, depths, answers))
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
  flags.DEFINE_bool("show_answers", False, "print every answer with its truth, per cell")


if __name__ == "__main__":
  from vita_jax import cli
  _define_flags()
  cli.run(main)
