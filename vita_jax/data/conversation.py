"""ChatML conversations -> token ids, loss mask and the visual token layout of docs/design.md#model.

    <|im_start|>{role}\n{content}<|im_end|>\n        (no default system prompt)

`<image>` / `<video>` in a message's content expand to their blocks; a sample whose messages
carry no placeholder but which has images (videos) gets them at the start of its first user
turn, as LLaVA does. Image (grid cols x rows, thumbnail first when more than one tile):

    <img> tpt*<IMG_CONTEXT> </img>
    then per tile row: \n, and per tile <patch> tpt*<PATCH_CONTEXT> </patch>

Video, per frame: <vid> tpt*<VID_CONTEXT> </vid>. Supervised tokens: assistant content plus its
`<|im_end|>\n`. The mask here is *unshifted* (token t is a target); packing shifts it.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from vita_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
_PLACEHOLDER = re.compile(r"(<image>|<video>)")


class SampleError(ValueError):
  """A sample that cannot be used; `reason` is the counter it goes to (e.g. `missing_file`)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class Encoded:
  ids: np.ndarray                 # int32 [L]
  supervised: np.ndarray          # bool [L], True where the token is a training target
  visual_order: list              # [("image", i) | ("video", j)] in token order
  message_ends: list              # token offset after each message
  visuals_before: list            # len(visual_order) consumed by the end of each message
  roles: list                     # role of each message


def image_block(tok: Tokenizer, tpt: int, grid: tuple[int, int]) -> list[int]:
  """Token ids of one image whose tile grid is (cols, rows)."""
  ids = tok.ids
  out = [ids["<img>"]] + [ids["<IMG_CONTEXT>"]] * tpt + [ids["</img>"]]
  cols, rows = grid
  if cols * rows > 1:
    patch = [ids["<patch>"]] + [ids["<PATCH_CONTEXT>"]] * tpt + [ids["</patch>"]]
    for _ in range(rows):
      out += [tok.newline_id] + patch * cols
  return out


def video_block(tok: Tokenizer, tpt: int, num_frames: int) -> list[int]:
  ids = tok.ids
  frame = [ids["<vid>"]] + [ids["<VID_CONTEXT>"]] * tpt + [ids["</vid>"]]
  return frame * num_frames


def tiles_of_grid(grid: tuple[int, int]) -> int:
  return grid[0] * grid[1] + (1 if grid[0] * grid[1] > 1 else 0)


def _with_default_placeholders(messages: list[dict], num_images: int, num_videos: int):
  text = "".join(m["content"] for m in messages)
  prefix = ""
  if num_videos and "<video>" not in text:
    prefix += "<video>\n" * num_videos
  if num_images and "<image>" not in text:
    prefix += "<image>\n" * num_images
  if not prefix:
    return messages
  messages = [dict(m) for m in messages]
  first_user = next((m for m in messages if m["role"] == "user"), None)
  if first_user is None:
    raise SampleError("bad_sample", "sample has images/videos but no user turn to put them in")
  first_user["content"] = prefix + first_user["content"]
  return messages


def encode_conversation(messages: list[dict], tok: Tokenizer, tpt: int,
                        image_grids: list[tuple[int, int]] = (),
                        video_frames: list[int] = ()) -> Encoded:
  """Token ids and target mask of a conversation; visual blocks sized by grids / frame counts."""
  messages = _with_default_placeholders(messages, len(image_grids), len(video_frames))
  ids, sup = [], []
  order, ends, before, roles = [], [], [], []
  next_image = next_video = 0
  im_start, im_end = tok.ids["<|im_start|>"], tok.ids["<|im_end|>"]
  for m in messages:
    role, content = m["role"], m["content"]
    if role not in ROLES:
      raise SampleError("bad_sample", f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    target = role == "assistant"
    header = [im_start] + tok.encode(f"{role}\n")
    ids += header
    sup += [False] * len(header)
    for piece in _PLACEHOLDER.split(content):
      if piece == "<image>":
        if next_image >= len(image_grids):
          raise SampleError("bad_sample", f"more <image> placeholders than the "
                            f"{len(image_grids)} image(s) listed")
        block = image_block(tok, tpt, image_grids[next_image])
        order.append(("image", next_image))
        next_image += 1
      elif piece == "<video>":
        if next_video >= len(video_frames):
          raise SampleError("bad_sample", f"more <video> placeholders than the "
                            f"{len(video_frames)} video(s) listed")
        block = video_block(tok, tpt, video_frames[next_video])
        order.append(("video", next_video))
        next_video += 1
      else:
        block = tok.encode(piece)
        ids += block
        sup += [target] * len(block)
        continue
      ids += block
      sup += [False] * len(block)  # visual tokens are never targets
    tail = [im_end, tok.newline_id]
    ids += tail
    sup += [target] * len(tail)
    ends.append(len(ids))
    before.append(len(order))
    roles.append(role)
  if next_image != len(image_grids) or next_video != len(video_frames):
    raise SampleError(
        "bad_sample", f"{next_image} <image> / {next_video} <video> placeholders for "
        f"{len(image_grids)} image(s) / {len(video_frames)} video(s)")
  return Encoded(np.asarray(ids, np.int32), np.asarray(sup, bool), order, ends, before, roles)


def truncate_at_turn(enc: Encoded, max_len: int) -> Encoded | None:
  """Keep the longest prefix of whole messages, ending with an assistant one, within max_len."""
  keep = None
  for k, (end, role) in enumerate(zip(enc.message_ends, enc.roles)):
    if end > max_len:
      break
    if role == "assistant":
      keep = k
  if keep is None:
    return None
  end, n_vis = enc.message_ends[keep], enc.visuals_before[keep]
  return Encoded(enc.ids[:end], enc.supervised[:end], enc.visual_order[:n_vis],
                 enc.message_ends[:keep + 1], enc.visuals_before[:keep + 1],
                 enc.roles[:keep + 1])
