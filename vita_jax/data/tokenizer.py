"""Tokenizer loading (a local directory) and the demo tokenizer's construction.

    tok = load_tokenizer("runs/demo_data/tokenizer")      # or a Qwen2.5 tokenizer directory
    tok.encode("What colour?")  ->  [ids]                  # never adds special tokens

Any directory `transformers.AutoTokenizer` reads works (a real Qwen2.5 directory unchanged);
the visual tokens of docs/design.md#tokens are added, in order, where absent, so for Qwen2.5
`<img>` is 151665.
"""

from __future__ import annotations

import functools
import os
import threading

from vita_jax.errors import ConfigError
from vita_jax.spec.tokens import CHATML_TOKENS, VISUAL_SPECIAL_TOKENS

SPECIAL_TOKENS = CHATML_TOKENS + VISUAL_SPECIAL_TOKENS


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the ids of the ChatML and visual special tokens."""

  def __init__(self, backend, path: str = ""):
    self.backend = backend        # tokenizers.Tokenizer (picklable)
    self.path = path
    self.ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in self.ids.items() if i is None]
    if missing:
      raise ConfigError(f"tokenizer {path!r} lacks {', '.join(missing)}")
    newline = self.encode("\n")
    if len(newline) != 1:
      raise ConfigError(f"tokenizer {path!r} splits '\\n' into {len(newline)} tokens")
    self.newline_id = newline[0]
    self.pad_id = self.ids["<|endoftext|>"]
    self.eos_id = self.ids["<|im_end|>"]

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    if not text:
      return []
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token(self, i: int) -> str:
    return self.backend.id_to_token(int(i))


_LOCK = threading.Lock()  # pipeline threads load the tokenizer concurrently on first use


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Tokenizer:
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    backend = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
  else:  # vocab.json + merges.txt (+ tokenizer_config.json), e.g. the Qwen2.5 release
    import transformers  # lazy: slow to import
    from tokenizers import AddedToken
    backend = transformers.AutoTokenizer.from_pretrained(path).backend_tokenizer
  absent = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
  if absent:  # in docs/design.md#tokens order, so Qwen2.5 gets <img>=151665, </img>=151666, ...
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in absent])
  return Tokenizer(backend, path)


def load_tokenizer(path: str) -> Tokenizer:
  """Load a tokenizer directory and add the visual special tokens where absent."""
  if not path or not os.path.isdir(path):
    raise ConfigError(
        f"tokenizer directory {path!r} not found; set --config.data.tokenizer to a directory "
        "with tokenizer.json (or vocab.json + merges.txt), e.g. a Qwen2.5 tokenizer")
  with _LOCK:
    return _load(path)


def token_ids(tok: Tokenizer) -> dict[str, int]:
  """The `config.model.tokens` fields this tokenizer implies."""
  return {
      "pad_id": tok.pad_id, "eos_id": tok.eos_id,
      "img_start_id": tok.ids["<img>"], "img_end_id": tok.ids["</img>"],
      "img_context_id": tok.ids["<IMG_CONTEXT>"], "vid_start_id": tok.ids["<vid>"],
      "vid_end_id": tok.ids["</vid>"], "vid_context_id": tok.ids["<VID_CONTEXT>"],
      "patch_start_id": tok.ids["<patch>"], "patch_end_id": tok.ids["</patch>"],
      "patch_context_id": tok.ids["<PATCH_CONTEXT>"],
  }


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def has_tokenizer(path: str) -> bool:
  """Whether `path` holds tokenizer files (tokenizer.json, or vocab.json + merges.txt)."""
  return bool(path) and (os.path.isfile(os.path.join(path, "tokenizer.json")) or (
      os.path.isfile(os.path.join(path, "vocab.json"))
      and os.path.isfile(os.path.join(path, "merges.txt"))))


def checkpoint_token_ids(model_dir: str, tokenizer: str = "") -> dict[str, int] | None:
  """Token ids from `tokenizer`, else from the tokenizer files inside `model_dir`, else None."""
  for path in (tokenizer, model_dir):
    if path and has_tokenizer(path):
      return token_ids(load_tokenizer(path))
  if tokenizer:
    raise ConfigError(f"--tokenizer={tokenizer!r} holds no tokenizer.json (nor vocab.json + "
                      "merges.txt)")
  return None


def checkpoint_model_config(model_dir: str, tokenizer: str = ""):
  """config.model of an HF checkpoint directory, its token ids read off the checkpoint's
  tokenizer when config.json does not list them (see spec.hf_config.model_config_from_hf)."""
  import json

  from vita_jax.spec.hf_config import model_config_from_hf
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{model_dir!r} has no config.json; pass a Hugging Face checkpoint "
                            "directory (e.g. one written by `python -m vita_jax.convert`)")
  with open(path) as f:
    hf = json.load(f)
  ids = None if hf.get("vita_special_tokens") else checkpoint_token_ids(model_dir, tokenizer)
  return model_config_from_hf(hf, ids, source=model_dir)


def check_token_ids(tok: Tokenizer, tokens_cfg) -> None:
  """Raise ConfigError when config.model.tokens disagrees with the tokenizer."""
  for key, value in token_ids(tok).items():
    if key in tokens_cfg and tokens_cfg[key] != value:
      raise ConfigError(
          f"config.model.tokens.{key}={tokens_cfg[key]} but tokenizer {tok.path!r} gives "
          f"{value}; use the tokenizer the model was built for (--config.data.tokenizer)")


def train_demo_tokenizer(texts, out_dir: str, vocab_size: int = 2048) -> None:
  """Byte-level BPE on `texts`; ids 0.. are SPECIAL_TOKENS in order (<|endoftext|>=0, ...)."""
  import transformers
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  backend = HFTokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
  backend.train_from_iterator(texts, trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      unk_token=None, model_max_length=1 << 20)
  fast.save_pretrained(out_dir)
