"""Videos: decode only the sampled frames (PyAV), one tile per frame.

Two sampling rules, both at no more than `fps` frames per second and at most `max_frames`:
- "release" (default): the Long-VITA release's rule, so released weights see the frames they
  were trained on. A video file with `n` frames at `rate` frames/s takes frame `int(i * step)`
  for `i < max_frames` while it is `< n`, with `step = max(rate / fps, n / (max_frames + 1))`.
  A directory of frame images (natural sort, 1 frame per second assumed) takes
  `target = int(min(n * fps, max_frames))` frames at indices `int(n / target) * i`.
- "uniform": the middle of each of `k` equal slots of the clip, `k <= fps * duration`.

Each frame is padded to a square with the ImageNet-mean colour and resized bicubically to the
tile (`pad_square=True`, the release's preprocessing), or stretched to the tile.
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from vita_jax.data import image as image_lib
from vita_jax.errors import InputError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SAMPLING_RULES = ("release", "uniform")


def release_file_indices(num_frames: int, rate: float, fps: float, max_frames: int) -> np.ndarray:
  """Frame indices of a video file under the release's rule (see the module docstring)."""
  step = max(rate / fps, num_frames / (max_frames + 1))
  indices = [int(i * step) for i in range(max_frames)]
  return np.asarray([i for i in indices if i < num_frames], np.int64)


def release_dir_indices(num_frames: int, fps: float, max_frames: int) -> np.ndarray:
  """Frame indices of a directory of frames (1 frame per second) under the release's rule."""
  target = int(min(num_frames * fps, max_frames))
  if target < 1:
    return np.zeros((0,), np.int64)
  return np.arange(target, dtype=np.int64) * int(num_frames / target)


def natural_key(name: str) -> list:
  """Sort key that orders "frame_2.png" before "frame_10.png"."""
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def sample_times(duration: float, fps: float, max_frames: int) -> np.ndarray:
  """Seconds at which to take frames: the middle of n equal slots, n <= fps*duration."""
  n = int(max(1, min(max_frames, np.floor(duration * fps))))
  return (np.arange(n) + 0.5) * duration / n


def sample_indices(num_frames: int, max_frames: int) -> np.ndarray:
  """Uniform frame indices (middle of each slot) for a clip given as frames."""
  n = min(num_frames, max_frames)
  return np.floor((np.arange(n) + 0.5) * num_frames / n).astype(np.int64)


def _decode_file(path: str, fps: float, max_frames: int, sampling: str) -> list[Image.Image]:
  import av  # lazy: only video samples need it

  with av.open(path) as container:
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
      duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
      duration = container.duration / av.time_base
    else:
      raise ValueError("video has no duration")
    rate = float(stream.average_rate or 30)
    if sampling == "release":
      num_frames = int(stream.frames) or int(round(duration * rate))
      times = release_file_indices(num_frames, rate, fps, max_frames) / rate
    else:
      times = sample_times(duration, fps, max_frames)
    half_frame = 0.5 / rate
    frames, last = [], None
    # Seek only when the next target is far ahead; close targets are reached by decoding on.
    for t in times:
      if last is None or t - last > 2.0:
        container.seek(int(t / stream.time_base), stream=stream, backward=True)
      frame = None
      for candidate in container.decode(stream):
        frame = candidate
        last = float(candidate.time) if candidate.time is not None else t
        if last + half_frame >= t:
          break
      if frame is None:
        if not frames:
          raise ValueError("no frame could be decoded")
        frames.append(frames[-1])  # past the end: repeat the last frame
        continue
      frames.append(frame.to_image())
    return frames


def _read_frame_dir(path: str, fps: float, max_frames: int, sampling: str) -> list[Image.Image]:
  names = sorted((n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES)),
                 key=natural_key)
  if not names:
    raise ValueError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in directory")
  indices = (release_dir_indices(len(names), fps, max_frames) if sampling == "release"
             else sample_indices(len(names), max_frames))
  if len(indices) == 0:
    indices = np.zeros((1,), np.int64)       # fewer frames than one per 1/fps seconds
  return [image_lib.load_image(os.path.join(path, names[i])) for i in indices]


def pad_to_square(image: Image.Image) -> Image.Image:
  """The image centred on a square of the ImageNet-mean colour (the release's frame padding)."""
  image = image.convert("RGB")
  side = max(image.width, image.height)
  if image.width == image.height:
    return image
  fill = tuple(int(c * 255) for c in image_lib.IMAGENET_MEAN)
  square = Image.new("RGB", (side, side), fill)
  square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
  return square


def load_video(path: str, tile: int, max_frames: int, fps: float = 1.0, *,
               sampling: str = "release", pad_square: bool = True) -> np.ndarray:
  """float32 [frames, tile, tile, 3], normalised; `path` is a video file or a frame directory."""
  if sampling not in SAMPLING_RULES:
    raise ValueError(f"video sampling {sampling!r} is unknown; use one of "
                     f"{', '.join(SAMPLING_RULES)}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"video {path!r} does not exist")
  if os.path.isdir(path):
    decode, errors = _read_frame_dir, (OSError, ValueError)
  else:
    import av  # lazy: only video samples need it
    decode, errors = _decode_file, (OSError, ValueError, IndexError, av.error.FFmpegError)
  try:
    frames = decode(path, fps, max_frames, sampling)
  except errors as e:
    raise InputError(f"video {path!r} cannot be decoded ({e}); pass a video file PyAV reads "
                     "(mp4, mkv, webm, ...) or a directory of frame images") from e
  if pad_square:
    frames = [pad_to_square(f) for f in frames]
  return image_lib.normalize(np.stack([image_lib.resize_square(f, tile) for f in frames]))


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
  """uint8 [n, h, w, 3] -> an mp4 file (h, w even). Used by the demo corpus and tests."""
  import av

  with av.open(path, mode="w") as container:
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    for pixels in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
