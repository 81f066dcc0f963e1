"""`make bench`: performance figures measured side by side with the baselines users would pick.

    make bench QUICK=1            # a few minutes: smaller shapes, fewer repeats
    make bench                    # the issue's shapes
    python -m benchmarks.run --only train,lm_head --quick

Each figure lives in its own module (`benchmarks/fig_*.py`) with a `run(ctx) -> list[Row]`;
`benchmarks/run.py` runs them in one process (8 fake CPU devices) and writes
`benchmarks/results/latest.json` and `latest.md`.
"""
