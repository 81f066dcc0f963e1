"""Images and videos: InternVL tiling rule and pixels, ImageNet normalisation, frame sampling."""

import os

import numpy as np
import pytest
from PIL import Image

from vita_jax.data import image as image_lib
from vita_jax.data import video as video_lib


def internvl_grid(width, height, image_size, max_num, min_num=1):
  """InternVL's dynamic_preprocess grid choice, written out naively (set + sort by area)."""
  aspect_ratio = width / height
  target_ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                      for j in range(1, n + 1) if min_num <= i * j <= max_num)
  target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
  best_diff, best = float("inf"), (1, 1)
  area = width * height
  for ratio in target_ratios:
    diff = abs(aspect_ratio - ratio[0] / ratio[1])
    if diff < best_diff:
      best_diff, best = diff, ratio
    elif diff == best_diff:
      if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
        best = ratio
  return best


def internvl_tiles(image, image_size, max_num):
  """Naive pixel reference: resize to the grid, crop tiles row-major, thumbnail first."""
  cols, rows = internvl_grid(*image.size, image_size, max_num)
  big = image.resize((cols * image_size, rows * image_size), Image.BICUBIC)
  tiles = []
  for i in range(cols * rows):
    x, y = (i % cols) * image_size, (i // cols) * image_size
    tiles.append(np.asarray(big.crop((x, y, x + image_size, y + image_size))))
  if len(tiles) > 1:
    tiles.insert(0, np.asarray(image.resize((image_size, image_size), Image.BICUBIC)))
  return np.stack(tiles)


@pytest.mark.parametrize("max_tiles", [1, 4, 6, 12])
def test_grid_matches_internvl_rule(max_tiles):
  tile = 448
  sizes = [(w, h) for w in (1, 100, 224, 448, 640, 672, 896, 1000, 1344, 2000, 4000)
           for h in (1, 90, 224, 448, 480, 672, 896, 1344, 3000)]
  # Exact ties between neighbouring ratios (e.g. 1.5 between 1 and 2) and area boundaries.
  sizes += [(672, 448), (1344, 448), (300, 200), (1500, 1000), (896, 448), (200, 100),
            (633, 633), (634, 634), (448 * 3, 448 * 2), (1, 4000), (4000, 1)]
  for w, h in sizes:
    assert image_lib.choose_grid(w, h, tile, max_tiles) == internvl_grid(w, h, tile, max_tiles), (
        w, h, max_tiles)


def test_grid_examples():
  assert image_lib.choose_grid(448 * 3, 448 * 2, 448, 12) == (3, 2)
  assert image_lib.choose_grid(448, 448, 448, 12) == (1, 1)      # small square: one tile
  assert image_lib.choose_grid(2000, 2000, 448, 12) == (3, 3)    # big square: more tiles
  assert image_lib.choose_grid(4000, 100, 448, 12) == (12, 1)


@pytest.mark.parametrize("size", [(56, 56), (170, 60), (60, 130), (112, 84), (30, 200)])
def test_dynamic_tiles_pixels(size):
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  got = image_lib.dynamic_tiles(image, 56, 6)
  want = internvl_tiles(image, 56, 6)
  assert got.shape == want.shape and got.dtype == np.float32
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(got, (want / 255.0 - mean) / std, atol=1e-5)


def test_video_file_sampling(tmp_path):
  # 16 s at 2 fps; each frame's grey level encodes its index.
  frames = np.stack([np.full((32, 32, 3), 8 * i, np.uint8) for i in range(32)])
  path = str(tmp_path / "v.mp4")
  video_lib.write_mp4(path, frames, fps=2)

  def indices(max_frames, sampling):
    v = video_lib.load_video(path, 28, max_frames, fps=1.0, sampling=sampling)
    grey = (v[:, 14, 14, 1] * 0.224 + 0.456) * 255
    return np.round(grey / 8).astype(int)

  # uniform, <= 1 fps: 16 frames at the middle of each second -> frame 2k+1.
  assert list(indices(100, "uniform")) == [2 * k + 1 for k in range(16)]
  # uniform, max 4 frames: middles of 4-second slots (2, 6, 10, 14 s) -> frames 4, 12, 20, 28.
  assert list(indices(4, "uniform")) == [4, 12, 20, 28]
  # release: step = max(rate / fps, n / (max_frames + 1)), frames int(i * step) while < n.
  assert list(indices(100, "release")) == list(range(0, 32, 2))          # step max(2, 0.32)
  assert list(indices(4, "release")) == [0, 6, 12, 19]                   # step 32 / 5 = 6.4


def test_video_frame_directory(tmp_path):
  folder = tmp_path / "frames"
  os.makedirs(folder)
  for i in range(10):
    Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(folder / f"{i:02d}.png")
  def indices(max_frames, sampling):
    v = video_lib.load_video(str(folder), 14, max_frames=max_frames, sampling=sampling)
    assert v.shape[1:] == (14, 14, 3)
    return list(np.round((v[:, 7, 7, 0] * 0.229 + 0.485) * 255 / 20).astype(int))

  assert indices(5, "uniform") == [1, 3, 5, 7, 9]  # the middle of each of 5 slots
  # release: target = int(min(n * fps, max_frames)) frames at int(n / target) * i
  assert indices(5, "release") == [0, 2, 4, 6, 8]
  assert indices(3, "release") == [0, 3, 6]
  assert indices(64, "release") == list(range(10))


def test_release_rules_match_their_formulas():
  for n, rate, max_frames in [(300, 30.0, 64), (7200, 25.0, 64), (90, 29.97, 128), (10, 1.0, 4)]:
    step = max(rate / 1.0, n / (max_frames + 1))
    want = [int(i * step) for i in range(max_frames) if int(i * step) < n]
    assert list(video_lib.release_file_indices(n, rate, 1.0, max_frames)) == want
  for n, max_frames in [(10, 4), (100, 64), (7, 64), (4096, 4096)]:
    target = int(min(n * 1.0, max_frames))
    want = [int(n / target) * i for i in range(target)]
    assert list(video_lib.release_dir_indices(n, 1.0, max_frames)) == want


def test_frame_directory_natural_sort(tmp_path):
  folder = tmp_path / "frames"
  os.makedirs(folder)
  for i in range(12):     # frame_2 must come before frame_10
    Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(folder / f"frame_{i}.png")
  v = video_lib.load_video(str(folder), 14, max_frames=12)
  grey = np.round((v[:, 7, 7, 0] * 0.229 + 0.485) * 255 / 20).astype(int)
  assert list(grey) == list(range(12))


def test_wide_frames_are_padded_with_the_mean_colour(tmp_path):
  folder = tmp_path / "wide"
  os.makedirs(folder)
  Image.fromarray(np.full((20, 40, 3), 255, np.uint8)).save(folder / "0.png")   # 40 x 20 white
  padded = video_lib.load_video(str(folder), 40, max_frames=1)[0]
  stretched = video_lib.load_video(str(folder), 40, max_frames=1, pad_square=False)[0]
  pixels = lambda v: np.round((v * np.array([0.229, 0.224, 0.225]) +
                               np.array([0.485, 0.456, 0.406])) * 255)
  # The release centres the frame on a square of the ImageNet mean (123, 116, 103).
  np.testing.assert_array_equal(pixels(padded[0, 0]), [123, 116, 103])
  np.testing.assert_array_equal(pixels(padded[39, 20]), [123, 116, 103])
  np.testing.assert_array_equal(pixels(padded[20, 20]), [255, 255, 255])
  np.testing.assert_array_equal(pixels(stretched[0, 0]), [255, 255, 255])


def test_sample_times_cap():
  assert len(video_lib.sample_times(3.2, 1.0, 64)) == 3      # <= 1 fps
  assert len(video_lib.sample_times(1000.0, 1.0, 64)) == 64  # <= max_frames
  assert len(video_lib.sample_times(0.2, 1.0, 64)) == 1      # at least one frame
