"""Dry run of the data a config would train on: what is read, what is skipped and why.

    python -m vita_jax.data.check --config=configs/stage2.py:tiny [--config.data.manifest=F]

Reads up to --max_samples samples of each source in file order, prepares them exactly as
training would, and prints per source the samples read / packed / skipped (by reason, with the
file:line of each skip), tokens-per-sample percentiles, packing efficiency for the config's
batch, and writes one decoded example with its loss targets marked ⟦like this⟧.
"""

from __future__ import annotations

import collections
import os

import numpy as np
from absl import flags

from vita_jax import cli
from vita_jax.data import pipeline
from vita_jax.data.manifest import JsonlSource, resolve_sources
from vita_jax.data.packing import BatchBuilder
from vita_jax.data.tokenizer import Tokenizer, load_tokenizer
from vita_jax.spec.tokens import CONTEXT_TOKENS

_MAX_SAMPLES = flags.DEFINE_integer("max_samples", 2000, "samples to read per source")
_OUT = flags.DEFINE_string("out", "runs/inspect", "folder for the decoded example")


def render(tok: Tokenizer, ids, supervised) -> str:
  """Decoded text; runs of visual context tokens shortened to `<IMG_CONTEXT>×n`, targets ⟦⟧."""
  context = {tok.ids[t] for t in CONTEXT_TOKENS}
  out, run, start = [], [], 0
  ids, supervised = list(map(int, ids)), list(map(bool, supervised))

  def flush(end):
    if not run:
      return
    text = (f"{tok.token(run[0])}×{len(run)}" if run[0] in context else tok.decode(run))
    out.append(f"⟦{text}⟧" if supervised[start] else text)

  for i, t in enumerate(ids):
    same = run and supervised[i] == supervised[start] and (
        (t in context) == (run[0] in context)) and (t not in context or t == run[0])
    if not same:
      flush(i)
      run, start = [], i
    run.append(t)
  flush(len(ids))
  return "".join(out)


def inspect_data(config, max_samples: int = 2000) -> dict:
  """Prepare up to max_samples per source; return counts, lengths, packing and one example."""
  data = config.data
  pipeline.prepare_data_files(data)
  tok = load_tokenizer(data.tokenizer)
  prepare = pipeline.make_prepare(config)
  report = {"sources": {}, "skips": [], "example": None}
  packed = []
  for src in resolve_sources(data):
    source = JsonlSource(src.name, src.files)
    counts, lengths = collections.Counter(), []
    for i in range(min(len(source), max_samples)):
      out = prepare(source[i])
      counts["read"] += 1
      if "skip" in out:
        counts[f"skipped/{out['skip']}"] += 1
        report["skips"].append((out["where"], out["skip"], out["message"]))
        continue
      counts["ok"] += 1
      lengths.append(len(out["input_ids"]))
      packed.append(out)
      best = report["example"]
      if best is None or (len(out["pixels"]) and not len(best["pixels"])):
        report["example"] = out
    report["sources"][src.name] = {"counts": dict(counts), "lengths": lengths}
  rows = data.global_batch_size
  kwargs = dict(batch_size=rows, seq_len=data.seq_len, tile=config.model.vision.image_size,
                tile_budget=data.tiles_per_batch or pipeline.default_tile_budget(
                    data.seq_len, rows, pipeline.tokens_per_tile(config.model)),
                pad_id=tok.pad_id, reset_positions=data.reset_positions)
  batches, builder = [], BatchBuilder(**kwargs)
  for s in packed:
    if not builder.fits(s):
      if builder.empty:
        continue
      batches.append(builder.build())
      builder = BatchBuilder(**kwargs)
      if not builder.fits(s):
        continue
    builder.add(s)
  if not builder.empty:
    batches.append(builder.build())
  report["packing"] = {
      "batches": len(batches), "rows": rows, "seq_len": data.seq_len,
      "samples": sum(b["num_samples"] for b in batches),
      "tokens": sum(b["num_tokens"] for b in batches),
      "tiles": sum(b["num_tiles"] for b in batches), "tile_budget": kwargs["tile_budget"]}
  return report


def format_report(report: dict, tok: Tokenizer) -> str:
  lines = []
  for name, src in report["sources"].items():
    c = src["counts"]
    skipped = {k.split("/", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("skipped/")}
    lines.append(f"source {name}: {c.get('read', 0)} read, {c.get('ok', 0)} usable, "
                 f"{sum(skipped.values())} skipped"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped
                    else ""))
    if src["lengths"]:
      p = np.percentile(src["lengths"], [50, 90, 99])
      lines.append(f"  tokens/sample: p50 {p[0]:.0f}  p90 {p[1]:.0f}  p99 {p[2]:.0f}  "
                   f"max {max(src['lengths'])}")
  for where, reason, message in report["skips"][:20]:
    lines.append(f"  skipped {where} [{reason}]: {message}")
  if len(report["skips"]) > 20:
    lines.append(f"  ... and {len(report['skips']) - 20} more skips")
  k = report["packing"]
  capacity = max(1, k["batches"] * k["rows"] * k["seq_len"])
  lines.append(
      f"packing: {k['samples']} samples into {k['batches']} batches of {k['rows']} x "
      f"{k['seq_len']} tokens; efficiency {100 * k['tokens'] / capacity:.1f}% "
      f"({k['tokens']} real tokens); tiles {k['tiles']} "
      f"(budget {k['tile_budget']} per batch, "
      f"{100 * k['tiles'] / max(1, k['batches'] * k['tile_budget']):.1f}% used)")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  report = inspect_data(config, _MAX_SAMPLES.value)
  tok = load_tokenizer(config.data.tokenizer)
  print(format_report(report, tok))
  example = report["example"]
  if example is not None:
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, "example.txt")
    text = render(tok, example["input_ids"], example["supervised"])
    with open(path, "w") as f:
      f.write(f"# {example['where']} ({len(example['input_ids'])} tokens, "
              f"{len(example['pixels'])} tiles); loss targets are marked ⟦like this⟧\n{text}")
    print(f"example ({example['where']}) with its loss targets marked ⟦…⟧ -> {path}:\n{text}")


_CONFIG = cli.define_config_flag()

if __name__ == "__main__":
  cli.run(main)
