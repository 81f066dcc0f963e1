"""Run the benchmark figures and write `benchmarks/results/latest.json` and `latest.md`.

    python -m benchmarks.run [--quick] [--only train,ring] [--out benchmarks/results]

All figures run in this one process on 8 fake CPU devices (ring attention and sharded prefill
need them; single-device figures use device 0). A figure that fails is recorded with its error
and the others still run.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import Context, load_average, machine_info  # noqa: E402

FIGURES = {  # name -> module
    "train": "benchmarks.fig_train",
    "generate": "benchmarks.fig_generate",
    "ring": "benchmarks.fig_ring",
    "lm_head": "benchmarks.fig_lm_head",
    "long_prefill": "benchmarks.fig_long_prefill",
    "torch_mirror": "benchmarks.fig_torch_mirror",
    "serve": "benchmarks.fig_serve",
}


def run_figures(names, ctx: Context) -> dict:
  """-> {"figures": {name: {"rows": [...], "seconds": s} or {"error": ...}}}."""
  out = {}
  for name in names:
    ctx.log(f"[bench] {name} ...")
    start = time.perf_counter()
    try:
      rows = importlib.import_module(FIGURES[name]).run(ctx)
      out[name] = {"rows": [r.to_json() for r in rows]}
    except Exception as e:  # noqa: BLE001 - one broken figure must not hide the others
      traceback.print_exc()
      out[name] = {"error": f"{type(e).__name__}: {e}"}
    out[name]["seconds"] = round(time.perf_counter() - start, 1)
    ctx.log(f"[bench] {name} done in {out[name]['seconds']} s")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
  parser.add_argument("--smoke", action="store_true", help="trivial shapes (tests only)")
  parser.add_argument("--only", default="", help=f"comma list of {','.join(FIGURES)}")
  parser.add_argument("--repeats", type=int, default=0, help="override the repeat count")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--name", default="latest", help="output file stem")
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(",") if n] or list(FIGURES)
  unknown = [n for n in names if n not in FIGURES]
  if unknown:
    parser.error(f"unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
  repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 5)
  mode = "smoke" if args.smoke else "quick" if args.quick else "full"

  started = time.perf_counter()
  result = dict(mode=mode, date=datetime.datetime.now().isoformat(timespec="seconds"),
                repeats=repeats, machine=machine_info(), load_average_start=load_average())
  import jax
  result["machine"]["jax_devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}"
  with tempfile.TemporaryDirectory(prefix="vita_bench_") as scratch:
    ctx = Context(quick=args.quick or args.smoke, repeats=repeats, scratch=scratch,
                  smoke=args.smoke, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["figures"] = run_figures(names, ctx)
  result["load_average_end"] = load_average()
  result["total_seconds"] = round(time.perf_counter() - started, 1)

  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, f"{args.name}.json")
  with open(json_path, "w") as f:
    json.dump(result, f, indent=1)
  md_path = os.path.join(args.out, f"{args.name}.md")
  with open(md_path, "w") as f:
    f.write(report.markdown(result))
  print(report.markdown(result))
  print(f"wrote {json_path} and {md_path}", file=sys.stderr)
  return 0 if all("error" not in fig for fig in result["figures"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
