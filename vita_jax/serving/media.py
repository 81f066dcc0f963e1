"""Images and videos named in a request -> decoded pixels, with no network access.

A URL is a `data:<mime>;base64,<payload>` URL, or a local path / `file://` URL inside the
server's `--media_root` (resolved, so `..` and symlinks cannot leave it). Anything else, and
anything that does not decode, is an InputError whose message names the part and the fix; the
API answers it with 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import urllib.parse

import numpy as np
from PIL import Image

from vita_jax.data import video as video_lib
from vita_jax.errors import InputError


def _data_url(url: str, what: str) -> tuple[str, bytes]:
  """(mime type, bytes) of a base64 data URL."""
  head, sep, payload = url.partition(",")
  if not sep or not head.endswith(";base64"):
    raise InputError(f"{what}: a data: URL must look like data:<type>;base64,<payload>")
  try:
    return head[5:-7], base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError) as e:
    raise InputError(f"{what}: the data: URL is not valid base64 ({e})") from e


def local_path(url: str, media_root: str, what: str) -> str:
  """The file a path or file:// URL names, checked to lie under `media_root`."""
  if url.startswith(("http://", "https://")):
    raise InputError(f"{what}: the server does not fetch from the network ({url[:60]!r}); send "
                     "the file as a data: URL")
  if not media_root:
    raise InputError(f"{what}: local paths are disabled on this server; send a data: URL, or "
                     "start the server with --media_root=DIR")
  path = urllib.parse.unquote(url[7:]) if url.startswith("file://") else url
  root = os.path.realpath(media_root)
  real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
  if os.path.commonpath([real, root]) != root:
    raise InputError(f"{what}: {path!r} is outside --media_root={media_root}; only files under "
                     "it can be read")
  if not os.path.exists(real):
    raise InputError(f"{what}: no such file {path!r} under --media_root")
  return real


def load_image(url: str, media_root: str, what: str = "image") -> Image.Image:
  """A fully decoded RGB image (corrupt data fails here, not in the model)."""
  try:
    if url.startswith("data:"):
      image = Image.open(io.BytesIO(_data_url(url, what)[1]))
    else:
      image = Image.open(local_path(url, media_root, what))
    image.load()
    return image.convert("RGB")
  except InputError:
    raise
  except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad data
    raise InputError(f"{what} could not be decoded as an image ({type(e).__name__}: {e}); "
                     "send a PNG, JPEG, WebP or BMP file") from e


def load_video(url: str, media_root: str, tile: int, max_frames: int,
               what: str = "video") -> np.ndarray:
  """Normalised frames float32 [n, tile, tile, 3] of a video file or a frame directory."""
  try:
    if url.startswith("data:"):
      mime, data = _data_url(url, what)
      suffix = "." + (mime.split("/")[-1] or "mp4")
      with tempfile.NamedTemporaryFile(suffix=suffix) as f:   # PyAV opens files by name
        f.write(data)
        f.flush()
        return video_lib.load_video(f.name, tile, max_frames)
    return video_lib.load_video(local_path(url, media_root, what), tile, max_frames)
  except InputError:
    raise
  except Exception as e:  # noqa: BLE001 - PyAV and PIL raise many kinds for bad data
    raise InputError(f"{what} could not be decoded as a video ({type(e).__name__}: {e}); send "
                     "an mp4/webm file or a directory of frame images") from e
