"""Videos: decode only the sampled frames (PyAV), one tile per frame.

Frames are sampled uniformly at no more than `fps` frames per second and at most `max_frames`,
each taken at the middle of its slot of the clip. A directory of frame images (sorted by name)
is also a video; its frames are sampled uniformly to at most `max_frames`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from vita_jax.data import image as image_lib

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def sample_times(duration: float, fps: float, max_frames: int) -> np.ndarray:
  """Seconds at which to take frames: the middle of n equal slots, n <= fps*duration."""
  n = int(max(1, min(max_frames, np.floor(duration * fps))))
  return (np.arange(n) + 0.5) * duration / n


def sample_indices(num_frames: int, max_frames: int) -> np.ndarray:
  """Uniform frame indices (middle of each slot) for a clip given as frames."""
  n = min(num_frames, max_frames)
  return np.floor((np.arange(n) + 0.5) * num_frames / n).astype(np.int64)


def _decode_file(path: str, fps: float, max_frames: int) -> list[Image.Image]:
  import av  # lazy: only video samples need it

  with av.open(path) as container:
    stream = container.streams.video[0]
    if stream.duration is not None and stream.time_base is not None:
      duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
      duration = container.duration / av.time_base
    else:
      raise ValueError("video has no duration")
    times = sample_times(duration, fps, max_frames)
    half_frame = 0.5 / float(stream.average_rate or 30)
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


def _read_frame_dir(path: str, max_frames: int) -> list[Image.Image]:
  names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES))
  if not names:
    raise ValueError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in directory")
  return [image_lib.load_image(os.path.join(path, names[i]))
          for i in sample_indices(len(names), max_frames)]


def load_video(path: str, tile: int, max_frames: int, fps: float = 1.0) -> np.ndarray:
  """float32 [frames, tile, tile, 3], normalised; `path` is a video file or a frame directory."""
  if os.path.isdir(path):
    frames = _read_frame_dir(path, max_frames)
  else:
    frames = _decode_file(path, fps, max_frames)
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
