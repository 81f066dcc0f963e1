"""Tokenizer ids, ChatML, the visual token layout of docs/design.md#tokens and the loss mask."""

import json
import pathlib

import numpy as np
import pytest

from configs import base
from vita_jax.data import demo
from vita_jax.data.conversation import (
  SampleError,
  encode_conversation,
  tiles_of_grid,
  truncate_at_turn,
)
from vita_jax.data.tokenizer import load_tokenizer
from vita_jax.spec import tokens as spec_tokens

REPO = pathlib.Path(__file__).resolve().parents[1]
QWEN_DIR = REPO.parent / "shared/data/qwen2.5-tokenizer"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
  return demo.ensure_demo_data(str(tmp_path_factory.getbasetemp() / "demo_data"))


@pytest.fixture(scope="module")
def tok(demo_root):
  return load_tokenizer(f"{demo_root}/tokenizer")


def ids_of(tok, tokens):
  return [tok.backend.token_to_id(t) if t.startswith("<") else tok.encode(t)[0] for t in tokens]


def test_demo_tokenizer_ids_match_tiny_config(tok):
  cfg = base.model_config("tiny")
  assert [tok.ids[t] for t in spec_tokens.CHATML_TOKENS] == [0, 1, 2]
  assert [tok.ids[t] for t in spec_tokens.VISUAL_SPECIAL_TOKENS] == list(range(3, 20))
  assert tok.vocab_size <= cfg.llm.vocab_size
  assert (cfg.tokens.img_context_id, cfg.tokens.vid_context_id,
          cfg.tokens.patch_context_id) == (5, 8, 11)
  assert tok.eos_id == cfg.tokens.eos_id and tok.pad_id == cfg.tokens.pad_id


def test_demo_tokenizer_loads_with_transformers(demo_root):
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(f"{demo_root}/tokenizer")
  assert hf.convert_tokens_to_ids(["<|im_end|>", "<IMG_CONTEXT>"]) == [2, 5]
  assert hf.decode(hf.encode("What colour is the shape?", add_special_tokens=False)) == \
      "What colour is the shape?"


@pytest.mark.skipif(not QWEN_DIR.is_dir(), reason=f"{QWEN_DIR} not present")
def test_qwen_tokenizer_ids():
  tok = load_tokenizer(str(QWEN_DIR))
  assert (tok.pad_id, tok.ids["<|im_start|>"], tok.eos_id) == (151643, 151644, 151645)
  expected = {t: 151665 + i for i, t in enumerate(spec_tokens.VISUAL_SPECIAL_TOKENS)}
  assert {t: tok.ids[t] for t in spec_tokens.VISUAL_SPECIAL_TOKENS} == expected
  cfg = base.model_config("14b").tokens
  assert (cfg.img_start_id, cfg.img_context_id, cfg.patch_context_id) == (151665, 151667, 151673)
  assert tok.newline_id == 198
  # ChatML built by hand, tokenized in pieces, equals the whole string tokenized at once.
  enc = encode_conversation([{"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": "Hello!"}], tok, 256)
  text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
  assert list(enc.ids) == tok.encode(text)


def block(ctx_open, ctx, ctx_close, tpt):
  return [ctx_open] + [ctx] * tpt + [ctx_close]


def test_layout_single_tile(tok):
  enc = encode_conversation([{"role": "user", "content": "<image>\nWhat?"},
                             {"role": "assistant", "content": "red"}], tok, 4, [(1, 1)])
  expected = (["<|im_start|>", "user\n"] + block("<img>", "<IMG_CONTEXT>", "</img>", 4)
              + ["\nWhat?", "<|im_end|>", "\n", "<|im_start|>", "assistant\n", "red",
                 "<|im_end|>", "\n"])
  want = []
  for t in expected:
    want += [tok.ids[t]] if t in tok.ids else tok.encode(t)
  assert list(enc.ids) == want
  assert enc.visual_order == [("image", 0)]


def test_layout_six_tiles_with_thumbnail(tok):
  enc = encode_conversation([{"role": "user", "content": "Look: <image> ok"},
                             {"role": "assistant", "content": "yes"}], tok, 4, [(3, 2)])
  assert tiles_of_grid((3, 2)) == 7
  i = tok.ids
  patch = block(i["<patch>"], i["<PATCH_CONTEXT>"], i["</patch>"], 4)
  image = block(i["<img>"], i["<IMG_CONTEXT>"], i["</img>"], 4)
  for _ in range(2):  # two tile rows of three tiles, each row opened by a newline
    image += [tok.newline_id] + patch * 3
  want = ([i["<|im_start|>"]] + tok.encode("user\n") + tok.encode("Look: ") + image
          + tok.encode(" ok") + [i["<|im_end|>"], tok.newline_id])
  assert list(enc.ids[:len(want)]) == want
  ids = np.asarray(enc.ids)
  assert (ids == i["<IMG_CONTEXT>"]).sum() == 4 and (ids == i["<PATCH_CONTEXT>"]).sum() == 24


def test_layout_five_frame_video(tok):
  enc = encode_conversation([{"role": "user", "content": "Which way?"},
                             {"role": "assistant", "content": "left"}], tok, 4, [], [5])
  i = tok.ids
  frames = block(i["<vid>"], i["<VID_CONTEXT>"], i["</vid>"], 4) * 5
  # No placeholder: the video goes first in the first user turn, then a newline (LLaVA).
  want = [i["<|im_start|>"]] + tok.encode("user\n") + frames + tok.encode("\nWhich way?")
  assert list(enc.ids[:len(want)]) == want
  assert len(frames) == 5 * 6


def test_loss_mask_exactly_on_assistant_spans(tok):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "<image>\nWhat colour is the shape?"},
              {"role": "assistant", "content": "red"},
              {"role": "user", "content": "And the shape?"},
              {"role": "assistant", "content": "a red circle"}]
  enc = encode_conversation(messages, tok, 4, [(2, 1)])
  spans, cur = [], []
  for t, s in zip(enc.ids, enc.supervised):
    if s:
      cur.append(int(t))
    elif cur:
      spans.append(tok.decode(cur))
      cur = []
  if cur:
    spans.append(tok.decode(cur))
  assert spans == ["red<|im_end|>\n", "a red circle<|im_end|>\n"]
  # Independent count: targets = assistant content + <|im_end|> + "\n".
  assert enc.supervised.sum() == len(tok.encode("red")) + len(tok.encode("a red circle")) + 4


def test_placeholder_mismatch_is_a_sample_error(tok):
  with pytest.raises(SampleError) as e:
    encode_conversation([{"role": "user", "content": "<image><image>"},
                         {"role": "assistant", "content": "x"}], tok, 4, [(1, 1)])
  assert e.value.reason == "bad_sample"


def test_truncate_at_turn_boundary(tok):
  messages = []
  for k in range(4):
    messages += [{"role": "user", "content": f"<image>\nQuestion {k}?"},
                 {"role": "assistant", "content": f"answer {k}"}]
  enc = encode_conversation(messages, tok, 4, [(2, 2)] * 4)
  limit = enc.message_ends[3] + 3  # two full turns fit, the third does not
  short = truncate_at_turn(enc, limit)
  assert len(short.ids) == enc.message_ends[3]
  assert short.visual_order == [("image", 0), ("image", 1)]
  np.testing.assert_array_equal(short.ids, enc.ids[:len(short.ids)])
  assert truncate_at_turn(enc, enc.message_ends[0]) is None  # no assistant turn fits


def test_llava_convert_round_trip(tmp_path, tok):
  from vita_jax.data import llava_convert
  from vita_jax.data.manifest import parse_sample

  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "a.png").write_bytes(b"")
  src = [{"id": "1", "image": "a.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]},
         {"id": "2", "conversations": [{"from": "robot", "value": "?"}]},
         {"id": "3", "conversations": [{"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello"}]}]
  (tmp_path / "llava.json").write_text(json.dumps(src))
  out = tmp_path / "data" / "mine" / "train.jsonl"
  counts = llava_convert.convert(str(tmp_path / "llava.json"), str(out), str(tmp_path / "imgs"))
  assert counts == {"written": 2, "unreadable": 1, "missing_media": 0}
  first = parse_sample(out.read_text().splitlines()[0])
  assert first["images"] == ["../../imgs/a.png"]
  assert first["messages"] == [{"role": "user", "content": "<image>\nWhat is it?"},
                               {"role": "assistant", "content": "a cat"}]
  # The LLaVA form is also read directly from a manifest line.
  assert parse_sample(json.dumps(src[0]))["messages"] == first["messages"]
