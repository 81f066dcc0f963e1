"""The markdown table of a benchmark result (docs/benchmarks.md includes it)."""

from __future__ import annotations


def _num(x) -> str:
  if x is None:
    return "—"
  if isinstance(x, str):
    return x
  ax = abs(x)
  if ax == 0:
    return "0"
  if ax >= 1e9:
    return f"{x / 1e9:.2f} G"
  if ax >= 1e6:
    return f"{x / 1e6:.2f} M"
  if ax >= 100:
    return f"{x:,.0f}"
  if ax >= 1:
    return f"{x:.2f}"
  return f"{x:.3g}"


def _verdict(passed) -> str:
  return {True: "pass", False: "**miss**", None: "—"}[passed]


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [
      f"Benchmarks ({result['mode']} mode, {result['date']}): {m['cpu']}, {m['cpu_count']} "
      f"cores, {m.get('jax_devices', '')}; load average {result['load_average_start'][0]} at "
      f"start, {result.get('load_average_end', ['?'])[0]} at end; median of "
      f"{result['repeats']} repeats. jax {m['versions'].get('jax')}, torch "
      f"{m['versions'].get('torch')}, transformers {m['versions'].get('transformers')}.",
      "",
      "| figure | measurement | ours | baseline | baseline is | ratio | target | result |",
      "|---|---|---|---|---|---|---|---|",
  ]
  notes = []
  for name, fig in result["figures"].items():
    if "error" in fig:
      lines.append(f"| {name} | failed: {fig['error'][:120]} | | | | | | |")
      continue
    for row in fig["rows"]:
      ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}x"
      lines.append(f"| {row['figure']} | {row['metric']} | {_num(row['ours'])} | "
                   f"{_num(row['baseline'])} | {row['baseline_name']} | {ratio} | "
                   f"{row['target'] or '—'} | {_verdict(row['passed'])} |")
      if row.get("note"):
        notes.append(f"- {row['figure']}, {row['metric']}: {row['note']}")
  if notes:
    lines += ["", "Notes:", ""] + notes
  return "\n".join(lines) + "\n"
