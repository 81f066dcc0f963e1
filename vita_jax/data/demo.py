"""The demo corpus: generated, deterministic, seconds to build, no downloads.

    python -m vita_jax.data.demo --out runs/demo_data

writes `<out>/demo/train.jsonl` (+ media), `<out>/demo_eval/eval.jsonl` and a byte-level BPE
tokenizer `<out>/tokenizer` (ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, then the
visual tokens 3..19). Samples: images of one coloured shape or a seven-segment digit (questions
about colour, shape, digit; some with two images), videos of a moving ball (which way?) as frame
folders and mp4 files, "needle" videos (one frame out of N differs: what does it show?) and
text-only arithmetic. The tiny configs generate it on first use (`ensure_demo_data`).

The needle vocabulary (six colours x four shapes) is taught in stage 2 by single-frame and short
needle videos and frame-sized shape images; stage 3 reads `<root>/needle/train.jsonl`
(`ensure_needle_curriculum`): needle videos of growing length in file order (a curriculum).
Needle seeds are split: training draws from [0, NEEDLE_EVAL_SEED_BASE), the evaluation
(`vita_jax.eval.needle`) from [NEEDLE_EVAL_SEED_BASE, 2**31), so no evaluation video was seen.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

DEMO_ROOT = "runs/demo_data"
VERSION = "3"
FRAME = 64          # video frame side (even, for mp4)
NEEDLE_QUESTION = "One frame of this video is different. What does it show?"

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
           "yellow": (235, 220, 20), "purple": (140, 40, 190), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
IMAGE_SIZES = ((56, 56), (112, 56), (56, 112), (112, 112), (168, 56), (84, 84), (160, 120))
BACKGROUND = (128, 128, 128)
# A shape spans 80% of the image's short side: ~45 px of a 56-px tile, about 3 x 3 of its 14-px
# patches, so the outline (round, cornered, slanted, notched) is visible to the tiny ViT.
SHAPE_FRAC = 0.8
NEEDLE_EVAL_SEED_BASE = 1 << 30
NEEDLE_DIR = "needle"
NEEDLE_VERSION = "6"
# Seven-segment digits: segments a b c d e f g lit per digit.
_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg",
             "abcdfg")

# Flags live in this command's own FlagValues (see vita_jax.cli.run).
FLAGS = flags.FlagValues()
flags.DEFINE_string("out", DEMO_ROOT, "output directory", flag_values=FLAGS)
flags.DEFINE_integer("frames", 8, "frames per demo video", flag_values=FLAGS)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, colour) -> None:
  x0, y0, x1, y1 = box
  if shape == "circle":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    draw.rectangle(box, fill=colour)
  elif shape == "triangle":
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
  else:
    w = (x1 - x0) / 3
    draw.rectangle((x0 + w, y0, x1 - w, y1), fill=colour)
    draw.rectangle((x0, y0 + w, x1, y1 - w), fill=colour)


def draw_digit(draw: ImageDraw.ImageDraw, digit: int, box, colour) -> None:
  x0, y0, x1, y1 = box
  ym, t = (y0 + y1) / 2, max(2, (x1 - x0) // 6)
  seg = {"a": (x0, y0, x1, y0 + t), "g": (x0, ym - t / 2, x1, ym + t / 2),
         "d": (x0, y1 - t, x1, y1),
         "f": (x0, y0, x0 + t, ym), "b": (x1 - t, y0, x1, ym),
         "e": (x0, ym, x0 + t, y1), "c": (x1 - t, ym, x1, y1)}
  for s in _SEGMENTS[digit]:
    draw.rectangle(seg[s], fill=colour)


def _box(rng, w, h, frac=0.6):
  side = int(min(w, h) * frac)
  x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
  return (x, y, x + side - 1, y + side - 1)


def shape_image(rng, size, shape, colour) -> Image.Image:
  image = Image.new("RGB", size, BACKGROUND)
  draw_shape(ImageDraw.Draw(image), shape, _box(rng, *size, frac=SHAPE_FRAC), COLOURS[colour])
  return image


def digit_image(rng, size, digit, colour) -> Image.Image:
  image = Image.new("RGB", size, BACKGROUND)
  x0, y0, x1, y1 = _box(rng, *size)
  draw_digit(ImageDraw.Draw(image), digit, (x0 + (x1 - x0) // 5, y0, x1 - (x1 - x0) // 5, y1),
             COLOURS[colour])
  return image


def moving_video(rng, num_frames: int, direction: str, colour: str) -> np.ndarray:
  """uint8 [n, FRAME, FRAME, 3]: a ball crossing the frame in `direction`."""
  dx, dy = DIRECTIONS[direction]
  r, span = 8, FRAME - 20
  cx, cy = int(rng.integers(16, FRAME - 16)), int(rng.integers(16, FRAME - 16))
  frames = []
  for i in range(num_frames):
    p = 10 + span * i / max(1, num_frames - 1)
    x = p if dx > 0 else FRAME - p if dx < 0 else cx
    y = p if dy > 0 else FRAME - p if dy < 0 else cy
    image = Image.new("RGB", (FRAME, FRAME), BACKGROUND)
    ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
    frames.append(np.asarray(image))
  return np.stack(frames)


def make_needle_video(num_frames: int, depth: float, seed: int) -> tuple[np.ndarray, str]:
  """uint8 [num_frames, FRAME, FRAME, 3] with one odd frame at round(depth*(n-1)); its answer.

  Haystack frames are grey with a small white dot; the needle frame shows a coloured shape.
  """
  rng = np.random.default_rng(seed)
  odd = int(round(depth * (num_frames - 1)))
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  frames = []
  for i in range(num_frames):
    if i == odd:
      frames.append(np.asarray(shape_image(rng, (FRAME, FRAME), shape, colour)))
      continue
    image = Image.new("RGB", (FRAME, FRAME), BACKGROUND)
    x, y = rng.integers(4, FRAME - 8, size=2)
    ImageDraw.Draw(image).ellipse((x, y, x + 4, y + 4), fill=(255, 255, 255))
    frames.append(np.asarray(image))
  return np.stack(frames), f"a {colour} {shape}"


def train_needle_seed(rng) -> int:
  """A needle-video seed for training data: always below NEEDLE_EVAL_SEED_BASE."""
  seed = int(rng.integers(NEEDLE_EVAL_SEED_BASE))
  assert 0 <= seed < NEEDLE_EVAL_SEED_BASE, seed
  return seed


def eval_needle_seed(num_frames: int, depth_index: int, sample: int) -> int:
  """The evaluation's seed for one video: unique per (length, depth, sample) and in the range
  training never draws from, so every evaluation video is unseen."""
  if not (0 < num_frames < 1 << 16 and 0 <= depth_index < 256 and 0 <= sample < 256):
    raise ValueError(f"needle cell out of range: frames={num_frames} (1..65535), depth index "
                     f"{depth_index} and sample {sample} (0..255); evaluate fewer cells")
  seed = NEEDLE_EVAL_SEED_BASE + (num_frames << 16) + (depth_index << 8) + sample
  assert NEEDLE_EVAL_SEED_BASE <= seed < 1 << 31, seed
  return seed


def _turns(*pairs, image_first: str = "") -> list[dict]:
  out = []
  for k, (q, a) in enumerate(pairs):
    out.append({"role": "user", "content": (image_first if k == 0 else "") + q})
    out.append({"role": "assistant", "content": a})
  return out


def _image_sample(rng, k: int, media: str, rel: str) -> dict:
  """One image conversation; writes its image(s) under `media`."""
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  size = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
  kind = rng.random()
  name = f"img_{k:05d}.png"
  if kind < 0.15:  # two images: which one has the colour?
    other = list(COLOURS)[(list(COLOURS).index(colour) + 1 + rng.integers(5)) % 6]
    first = rng.random() < 0.5
    a, b = (colour, other) if first else (other, colour)
    shape_image(rng, size, SHAPES[rng.integers(4)], a).save(os.path.join(media, name))
    name2 = f"img_{k:05d}b.png"
    shape_image(rng, size, SHAPES[rng.integers(4)], b).save(os.path.join(media, name2))
    q = f"<image>\n<image>\nWhich image has the {colour} shape, the first or the second?"
    return {"id": f"img{k}", "messages": _turns((q, "first" if first else "second")),
            "images": [f"{rel}/{name}", f"{rel}/{name2}"]}
  if kind < 0.4:
    digit = int(rng.integers(10))
    digit_image(rng, size, digit, colour).save(os.path.join(media, name))
    pairs = [("What digit is shown?", str(digit))]
    if rng.random() < 0.5:
      pairs.append(("What colour is the digit?", colour))
  else:
    shape = SHAPES[rng.integers(4)]
    shape_image(rng, size, shape, colour).save(os.path.join(media, name))
    pairs = [("What colour is the shape?", colour), ("What shape is this?", shape),
             ("Describe the image.", f"a {colour} {shape}")]
    rng.shuffle(pairs)
    pairs = pairs[:1 + rng.integers(3)]
  if rng.random() < 0.2:  # LLaVA form, image placeholder implied
    conv = [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]}
            for t in _turns(*pairs)]
    return {"id": f"img{k}", "image": f"{rel}/{name}", "conversations": conv}
  return {"id": f"img{k}", "messages": _turns(*pairs, image_first="<image>\n"),
          "images": [f"{rel}/{name}"]}


def _save_frames(frames: np.ndarray, folder: str) -> None:
  os.makedirs(folder, exist_ok=True)
  for i, f in enumerate(frames):
    Image.fromarray(f).save(os.path.join(folder, f"{i:03d}.png"))


def _video_sample(rng, k: int, media: str, rel: str, num_frames: int, as_mp4: bool) -> dict:
  from vita_jax.data.video import write_mp4

  if as_mp4 or rng.random() < 0.5:  # needle videos stay frame folders: 1 fps keeps every frame
    direction = list(DIRECTIONS)[rng.integers(4)]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    # mp4: 2 fps for num_frames seconds, sampled back to num_frames at 1 fps.
    frames = moving_video(rng, 2 * num_frames if as_mp4 else num_frames, direction, colour)
    q, a = "<video>\nWhich way does the ball move?", direction
  else:
    # 1..num_frames frames: a one-frame "needle" ties the frame tokens to the vocabulary.
    length = 1 + int(rng.integers(num_frames)) if rng.random() < 0.5 else num_frames
    seed = train_needle_seed(rng)
    frames, a = make_needle_video(length, rng.random(), seed)
    q = f"<video>\n{NEEDLE_QUESTION}"
    name = f"vid_{k:05d}"
    _save_frames(frames, os.path.join(media, name))
    return {"id": f"vid{k}-needle{seed}", "messages": _turns((q, a)), "videos": [f"{rel}/{name}"]}
  if as_mp4:
    name = f"vid_{k:05d}.mp4"
    write_mp4(os.path.join(media, name), frames, fps=2)
  else:
    name = f"vid_{k:05d}"
    _save_frames(frames, os.path.join(media, name))
  return {"id": f"vid{k}", "messages": _turns((q, a)), "videos": [f"{rel}/{name}"]}


def _text_sample(rng, k: int) -> dict:
  a, b = (int(x) for x in rng.integers(0, 10, size=2))
  if rng.random() < 0.5:
    pairs = [(f"What is {a} plus {b}?", str(a + b))]
  else:
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    pairs = [(f"Repeat the word {colour}.", colour), (f"What is {a} times {b}?", str(a * b))]
  messages = _turns(*pairs)
  if rng.random() < 0.3:
    messages.insert(0, {"role": "system", "content": "Answer with one word."})
  return {"id": f"txt{k}", "messages": messages}


def _write_split(out: str, name: str, seed: int, sizes: dict, num_frames: int) -> list[str]:
  rng = np.random.default_rng(seed)
  folder = os.path.join(out, name)
  media = os.path.join(folder, "media")
  os.makedirs(media, exist_ok=True)
  samples = [_image_sample(rng, k, media, "media") for k in range(sizes["image"])]
  samples += [_video_sample(rng, k, media, "media", num_frames, k < sizes["mp4"])
              for k in range(sizes["video"])]
  samples += [_text_sample(rng, k) for k in range(sizes["text"])]
  order = rng.permutation(len(samples))
  lines = [json.dumps(samples[i]) for i in order]
  with open(os.path.join(folder, "eval.jsonl" if "eval" in name else "train.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  texts = []
  for s in samples:
    turns = s.get("messages") or [{"role": t["from"], "content": t["value"]}
                                  for t in s["conversations"]]
    texts += [f"{t['role']}\n{t['content']}\n" for t in turns]
  return texts


def generate(out: str, num_frames: int = 8) -> None:
  """Write the corpus and tokenizer into `out` (deterministic)."""
  from vita_jax.data.tokenizer import train_demo_tokenizer

  texts = _write_split(out, "demo", 0, dict(image=2400, video=400, mp4=16, text=300), num_frames)
  texts += _write_split(out, "demo_eval", 1, dict(image=60, video=40, mp4=4, text=20),
                        num_frames)
  texts += ["user\n", "assistant\n", "system\n"]
  train_demo_tokenizer(texts, os.path.join(out, "tokenizer"))
  with open(os.path.join(out, "VERSION"), "w") as f:
    f.write(VERSION + "\n")


def ensure_demo_data(root: str = DEMO_ROOT, num_frames: int = 8) -> str:
  """Generate the corpus at `root` unless it is already there; safe for concurrent callers."""
  if _is_complete(root):
    return root
  tmp = f"{root.rstrip('/')}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  generate(tmp, num_frames)
  os.makedirs(root, exist_ok=True)
  stale = os.path.exists(os.path.join(root, "VERSION"))  # an older corpus version: replace it
  for child in sorted(os.listdir(tmp)):
    target = os.path.join(root, child)
    if stale and child != "VERSION":
      shutil.rmtree(target, ignore_errors=True)
    if child == "VERSION" or os.path.exists(target):
      continue  # someone else (or an earlier partial run) already put it there
    os.replace(os.path.join(tmp, child), target)
  os.replace(os.path.join(tmp, "VERSION"), os.path.join(root, "VERSION"))
  shutil.rmtree(tmp, ignore_errors=True)
  return root


def _is_complete(root: str, name: str = "VERSION", version: str = VERSION) -> bool:
  try:
    with open(os.path.join(root, name)) as f:
      return f.read().strip() == version
  except OSError:
    return False


# Needle videos per length in the stage-3 curriculum: more of the long ones, where finding the
# odd frame early in the video is hardest (the shortest ones mostly teach the question's form).
NEEDLE_CURRICULUM = {8: 150, 16: 250, 24: 400, 32: 700}
# A quarter of the curriculum puts up to 1,024 filler digits (one token each) between the video
# and the question, so the distance from the needle to the question reaches past what 64- and
# 128-frame videos need (6 tokens a frame: 384 and 768) while no training video exceeds 32
# frames; docs/demo.md measures what the filler length does at 128 frames.
NEEDLE_FILLER_SHARE, NEEDLE_FILLER_WORDS = 0.25, 1024


def write_needle_curriculum(out: str, counts: dict[int, int] | None = None,
                            seed: int = 2) -> str:
  """`<out>/train.jsonl`: `counts[n]` needle videos of `n` frames, shortest first.

  Stage 3 reads this source in file order (`data.ordered_sources`), so the packed sequences
  hold ever longer videos: the model first finds the odd frame among 8, last among 32.
  Depths are uniform over the whole video; seeds come from the training range only. A share
  of the samples (NEEDLE_FILLER_SHARE) carries filler digits before the question.
  """
  counts = NEEDLE_CURRICULUM if counts is None else counts
  rng = np.random.default_rng(seed)
  media = os.path.join(out, "media")
  os.makedirs(media, exist_ok=True)
  lines = []
  for n in sorted(counts):
    for _ in range(counts[n]):
      k, video_seed = len(lines), train_needle_seed(rng)
      frames, answer = make_needle_video(n, rng.random(), video_seed)
      _save_frames(frames, os.path.join(media, f"n{k:05d}"))
      filler = ""
      if rng.random() < NEEDLE_FILLER_SHARE:   # digits between the video and the question
        words = rng.integers(0, 10, size=int(rng.integers(1, NEEDLE_FILLER_WORDS + 1)))
        filler = " ".join(map(str, words)) + "\n"
      lines.append(json.dumps({"id": f"needle{video_seed}", "videos": [f"media/n{k:05d}"],
                               "messages": _turns((f"<video>\n{filler}{NEEDLE_QUESTION}",
                                                   answer))}))
  with open(os.path.join(out, "train.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return out


def ensure_needle_curriculum(root: str = DEMO_ROOT) -> str:
  """`<root>/needle` (stage 3's curriculum) unless already there; safe for concurrent callers."""
  folder = os.path.join(root, NEEDLE_DIR)
  if _is_complete(folder, "NEEDLE_VERSION", NEEDLE_VERSION):
    return folder
  tmp = f"{folder}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  write_needle_curriculum(tmp)
  with open(os.path.join(tmp, "NEEDLE_VERSION"), "w") as f:
    f.write(NEEDLE_VERSION + "\n")
  shutil.rmtree(folder, ignore_errors=True)
  try:
    os.replace(tmp, folder)
  except OSError:  # another process put it there first
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def main(argv) -> None:
  f = FLAGS
  if _is_complete(f.out):
    print(f"{f.out} already holds the demo corpus (version {VERSION})")
    return
  ensure_demo_data(f.out, f.frames)
  print(f"wrote the demo corpus to {f.out}")


if __name__ == "__main__":
  from vita_jax import cli
  cli.run(main, flag_values=FLAGS)
