"""Images: InternVL dynamic tiling (docs/design.md#model) and ImageNet normalisation.

    tiles = dynamic_tiles(pil_image, tile=448, max_tiles=12)   # float32 [n, 448, 448, 3]

The grid (cols, rows) with 1 <= cols*rows <= max_tiles is the one whose aspect ratio is closest
to the image's; among grids with the same aspect ratio a larger one is taken only while the
image has more than half of its pixels (InternVL's `find_closest_aspect_ratio`). When the grid
has more than one tile, a whole-image thumbnail comes first, then the tiles in row-major order;
this is also the order of the `<img>`/`<patch>` blocks in the token layout.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from vita_jax.errors import InputError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
  """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, by tile count then cols."""
  grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
           if min_tiles <= c * r <= max_tiles]
  return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def choose_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
  """The InternVL grid (cols, rows) for an image of width x height pixels."""
  aspect = width / height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in candidate_grids(max_tiles):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
      best = (cols, rows)
  return best


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 ImageNet-normalised."""
  return (pixels.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def resize_square(image: Image.Image, tile: int) -> np.ndarray:
  """One bicubic tile of the whole image (video frames, thumbnails): uint8 [tile, tile, 3]."""
  return np.asarray(image.convert("RGB").resize((tile, tile), Image.BICUBIC))


def tile_grid(image: Image.Image, tile: int, max_tiles: int) -> np.ndarray:
  """uint8 [cols*rows, tile, tile, 3]: the resized image cut into its grid, row-major."""
  image = image.convert("RGB")
  cols, rows = choose_grid(image.width, image.height, tile, max_tiles)
  big = np.asarray(image.resize((cols * tile, rows * tile), Image.BICUBIC))
  # [rows*tile, cols*tile, 3] -> [rows, cols, tile, tile, 3]
  grid = big.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * cols, tile, tile, 3)


def dynamic_tiles(image: Image.Image, tile: int, max_tiles: int,
                  thumbnail: bool = True) -> np.ndarray:
  """float32 [n, tile, tile, 3], normalised: thumbnail (if >1 tile) then tiles row-major."""
  tiles = tile_grid(image, tile, max_tiles)
  if thumbnail and len(tiles) > 1:
    tiles = np.concatenate([resize_square(image, tile)[None], tiles])
  return normalize(tiles)


def grid_of(image_size: tuple[int, int], tile: int, max_tiles: int) -> tuple[int, int]:
  """(cols, rows) for an image of (width, height); what the token layout needs."""
  return choose_grid(image_size[0], image_size[1], tile, max_tiles)


def load_image(path: str) -> Image.Image:
  """Open and fully decode (so corrupt files fail here, not later). A missing file raises
  FileNotFoundError; a file Pillow cannot decode raises InputError naming it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"image {path!r} does not exist")
  try:
    with Image.open(path) as image:
      image.load()
      return image.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise InputError(f"image {path!r} cannot be decoded ({e}); pass a PNG, JPEG or another "
                     "format Pillow reads") from e
