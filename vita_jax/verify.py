"""Cross-framework numerical verification of one checkpoint (docs/design.md#precision).

    python -m vita_jax.verify --model=DIR [--dtype=float32|bfloat16] [--against=torch,transformers]

Loads DIR (either HF layout) in JAX and in every framework of --against, runs the same random
inputs — text only, with images (3 tiles), and packing (two samples with restarting positions,
an image, padding) — and prints max/mean |delta| against JAX of the logits and of the projected
vision features. Tolerance: max|delta| <= tol * max(1, max|JAX value|) with tol 1e-4 in float32
and 2e-2 in bfloat16. Exits 1 when any row fails, 0 otherwise.

transformers reads the internvl layout: a long_vita directory is converted to a temporary one
first (with vita_jax.convert), and packed rows are compared sample by sample, since transformers
has no segment ids. A checkpoint the internvl layout cannot express (the release's bias-free
projector) is skipped for transformers with a note.
"""

from __future__ import annotations

import tempfile

import numpy as np
from absl import flags

from vita_jax.errors import ConfigError

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
FRAMEWORKS = ("torch", "transformers")

# Flags live in this command's own FlagValues (see vita_jax.cli.run).
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "HF checkpoint directory (either layout)", required=True,
                    flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", list(TOLERANCE), "dtype both frameworks compute in",
                  flag_values=FLAGS)
flags.DEFINE_string("against", ",".join(FRAMEWORKS),
                    "comma-separated subset of " + ",".join(FRAMEWORKS), flag_values=FLAGS)
flags.DEFINE_string("tokenizer", "", "tokenizer directory (default: the --model directory's "
                    "files, if any)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the random inputs", flag_values=FLAGS)


def make_cases(cfg, *, batch: int = 2, seq: int = 32, tiles: int = 3, seed: int = 0) -> dict:
  """{name: dict(ids [B,S], pixels NHWC or None, positions, segment_ids, spans)} from cfg.

  `spans` lists (row, start, end, uses_pixels) of independent samples, for frameworks without
  segment ids (None: the whole batch is one call). Context tokens use the config's first
  visual context id.
  """
  from vita_jax.models.vlm import context_token_ids
  from vita_jax.spec.tokens import tokens_per_tile
  rng = np.random.default_rng(seed)
  tpt, side = tokens_per_tile(cfg), cfg.vision.image_size
  context = context_token_ids(cfg.tokens)
  image_id = context[0]
  seq = max(seq, tiles * tpt + 16)

  def text(shape):
    ids = rng.integers(0, cfg.llm.vocab_size, shape)
    return np.where(np.isin(ids, context), (ids + 1) % cfg.llm.vocab_size, ids)

  def pixels(n):
    return rng.standard_normal((n, side, side, 3)).astype(np.float32)

  ones = np.ones((batch, seq), np.int64)
  arange = np.tile(np.arange(seq), (batch, 1))
  cases = {"text": dict(ids=text((batch, seq)), pixels=None, positions=arange,
                        segment_ids=ones, spans=None)}
  ids = text((batch, seq))
  need = tiles * tpt
  for r in range(batch):                       # spread the image tokens over the rows
    n = need // batch + (r < need % batch)
    ids[r, 2:2 + n] = image_id
  cases["images"] = dict(ids=ids, pixels=pixels(tiles), positions=arange, segment_ids=ones,
                         spans=None)        # the tiles run over row ends: one batched call
  # Packing: row 0 = [sample A with the tiles | sample B | padding]; row 1 = one text sample.
  # (The same tile count as "images", so a jitted model compiles once for both.)
  ids, cut, pad = text((batch, seq)), need + 6, 3
  ids[0, 2:2 + need] = image_id
  segments, positions = ones.copy(), arange.copy()
  segments[0, cut:seq - pad], segments[0, seq - pad:] = 2, 0
  positions[0, cut:] = np.arange(seq - cut)
  positions[0, seq - pad:] = 0
  cases["packing"] = dict(ids=ids, pixels=pixels(tiles), positions=positions,
                          segment_ids=segments, spans=[(0, 0, cut, True),
                                                       (0, cut, seq - pad, False),
                                                       (1, 0, seq, False)])
  return cases


# ---------------------------------------------------------------- runners: case -> arrays


def _jax_forward(model, ids, pixels, positions, segment_ids):
  logits = model(ids, pixels, positions, segment_ids)
  return logits, None if pixels is None else model.image_features(pixels)


_jitted_forward = None


def run_jax(model, case):
  import jax.numpy as jnp
  from flax import nnx
  global _jitted_forward
  if _jitted_forward is None:                    # one jit: compiled once per input shape
    _jitted_forward = nnx.jit(_jax_forward)
  px = None if case["pixels"] is None else jnp.asarray(case["pixels"])
  logits, feats = _jitted_forward(
      model, jnp.asarray(case["ids"], jnp.int32), px,
      jnp.asarray(case["positions"], jnp.int32), jnp.asarray(case["segment_ids"], jnp.int32))
  return _np(logits), None if feats is None else _np(feats)


def _np(x):
  return np.asarray(x, np.float32) if not hasattr(x, "detach") else x.detach().float().cpu().numpy()


def _nchw(pixels):
  import torch
  return None if pixels is None else torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def run_torch(model, case):
  import torch
  px = _nchw(case["pixels"])
  with torch.no_grad():
    logits = model(torch.from_numpy(case["ids"]), px, torch.from_numpy(case["positions"]),
                   torch.from_numpy(case["segment_ids"]))
    feats = None if px is None else model.image_features(px)
  return _np(logits), None if feats is None else _np(feats)


def run_transformers(model, case):
  """Logits sample by sample (spans); padding rows stay NaN and are not compared. The internvl
  layout has one image token: every visual context id becomes it (as vita_jax.convert does)."""
  import torch
  ids = case["ids"]
  case = dict(case, ids=np.where(np.isin(ids, case["context_ids"]), case["context_ids"][0], ids))
  px = _nchw(case["pixels"])
  if px is not None:
    px = px.to(model.dtype)
  logits = None
  with torch.no_grad():
    if case["spans"] is None:
      extra = {} if px is None else {"pixel_values": px}
      logits = _np(model(input_ids=torch.from_numpy(case["ids"]), **extra).logits)
    for row, start, end, uses_pixels in case["spans"] or ():
      ids = torch.from_numpy(case["ids"][row:row + 1, start:end])
      extra = {"pixel_values": px} if uses_pixels and px is not None else {}
      out = _np(model(input_ids=ids, **extra).logits)
      if logits is None:
        logits = np.full(case["ids"].shape + (out.shape[-1],), np.nan, np.float32)
      logits[row, start:end] = out[0]
    feats = None if px is None else _np(model.model.get_image_features(pixel_values=px)
                                        .pooler_output)
  return logits, feats


def load_transformers(path: str, layout: str, dtype: str, workdir: str):
  import torch
  from transformers import InternVLForConditionalGeneration
  if layout != "internvl":
    from vita_jax.convert import convert
    convert(path, workdir, "internvl", dtype="float32")
    path = workdir
  return InternVLForConditionalGeneration.from_pretrained(
      path, dtype=getattr(torch, dtype)).eval()


# ---------------------------------------------------------------- comparison + table


def compare(ref, got, tol):
  """(max |delta|, mean |delta|, bound, ok) over entries both frameworks computed."""
  keep = ~np.isnan(got)
  delta = np.abs(got[keep] - ref[keep])
  bound = tol * max(1.0, float(np.abs(ref[keep]).max()))
  worst = float(delta.max()) if delta.size else 0.0
  return worst, float(delta.mean()) if delta.size else 0.0, bound, worst <= bound


def prompt_case(cfg, tokenizer_dir: str) -> dict:
  """One real prompt through the checkpoint's tokenizer: a wide image (thumbnail + 2 tiles) and
  a question, as vita_jax.generate builds it; the model's token ids are checked against the
  tokenizer first (a mismatch is a ConfigError naming the first id that differs)."""
  from PIL import Image

  from vita_jax.data.prompt import encode_prompt
  from vita_jax.data.tokenizer import check_token_ids, load_tokenizer
  tok = load_tokenizer(tokenizer_dir)
  check_token_ids(tok, cfg.tokens)
  side = cfg.vision.image_size
  pixels = np.zeros((side, 2 * side, 3), np.uint8)
  pixels[:, :side, 0], pixels[:, side:, 2] = 220, 200
  with tempfile.TemporaryDirectory() as tmp:
    image = f"{tmp}/wide.png"
    Image.fromarray(pixels).save(image)
    ids, px = encode_prompt(cfg, tok, "<image>\nWhat colours do you see?", [image], [], 1)
  ids = np.asarray(ids, np.int64)
  s = ids.shape[1]
  return dict(ids=ids, pixels=px, positions=np.arange(s)[None], segment_ids=np.ones_like(ids),
              spans=None)


def find_tokenizer(path: str, tokenizer: str = "") -> str:
  from vita_jax.data.tokenizer import has_tokenizer
  return next((d for d in (tokenizer, path) if d and has_tokenizer(d)), "")


def verify(path: str, dtype: str = "float32", against=FRAMEWORKS, seed: int = 0, out=print,
           tokenizer: str = ""):
  """Run every case in every framework; print the table; return the rows (dicts). With a
  tokenizer (`tokenizer`, or files in `path`) a "prompt" case runs a tokenized image prompt."""
  import vita_jax
  from vita_jax.models.vlm import context_token_ids
  unknown = [f for f in against if f not in FRAMEWORKS]
  if unknown:
    raise ConfigError(f"unknown framework {', '.join(unknown)} in --against; use a subset of "
                      f"{','.join(FRAMEWORKS)}")
  tol = TOLERANCE[dtype]
  tokenizer = find_tokenizer(path, tokenizer)
  jax_model = vita_jax.load_pretrained(path, dtype=dtype, tokenizer=tokenizer)
  cfg = jax_model.config
  cases = make_cases(cfg, seed=seed)
  if tokenizer:
    cases["prompt"] = prompt_case(cfg, tokenizer)
  else:
    out(f"note: no tokenizer in {path!r} (pass --tokenizer=DIR): the tokenized prompt case is "
        "skipped")
  context = np.asarray(context_token_ids(cfg.tokens))
  cases = {name: dict(case, context_ids=context) for name, case in cases.items()}
  reference = {name: run_jax(jax_model, case) for name, case in cases.items()}
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for framework in against:
      if framework == "torch":
        import torch

        import vita_torch
        model = vita_torch.load_pretrained(path, dtype=getattr(torch, dtype), tokenizer=tokenizer)
        runner = run_torch
      elif framework == "transformers":
        try:
          model = load_transformers(path, cfg.layout, dtype, workdir)
        except ValueError as e:
          out(f"note: transformers skipped: {e}")
          continue
        runner = run_transformers
      for name, case in cases.items():
        logits, feats = runner(model, case)
        for what, ref, got in (("logits", reference[name][0], logits),
                               ("vision", reference[name][1], feats)):
          if ref is None or got is None:
            continue
          worst, mean, bound, ok = compare(ref, got, tol)
          rows.append(dict(framework=framework, case=name, output=what, max=worst, mean=mean,
                           bound=bound, ok=ok))
  out(f"vita_jax.verify  {path}  ({cfg.layout} layout, {dtype}; reference: JAX)")
  out(f"{'framework':<13}{'case':<9}{'output':<8}{'max|d|':>11}{'mean|d|':>11}{'bound':>11}  ok")
  for r in rows:
    out(f"{r['framework']:<13}{r['case']:<9}{r['output']:<8}{r['max']:>11.3e}{r['mean']:>11.3e}"
        f"{r['bound']:>11.3e}  {'PASS' if r['ok'] else 'FAIL'}")
  return rows


def main(argv) -> int:

  f = FLAGS
  against = [a.strip() for a in f.against.split(",") if a.strip()]
  unknown = sorted(set(against) - set(FRAMEWORKS))
  if unknown:
    raise ConfigError(f"--against={f.against!r}: unknown framework(s) {unknown}; use a subset of "
                      f"{','.join(FRAMEWORKS)}")
  rows = verify(f.model, f.dtype, against, f.seed, tokenizer=f.tokenizer)
  if not rows:
    raise ConfigError("nothing was compared; pass --against=torch,transformers")
  failed = [r for r in rows if not r["ok"]]
  names = ", ".join(f"{r['framework']}/{r['case']}/{r['output']}" for r in failed)
  print(f"{len(rows) - len(failed)}/{len(rows)} within tolerance"
        + (f"; FAILED: {names}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  from vita_jax import cli
  cli.run(main, flag_values=FLAGS)
