# Two commands from a fresh clone: `make train` and `make test` (each creates .venv if needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
QUICK ?= 0
PYTEST_WORKERS ?= 2

.PHONY: setup browser setup-cuda train test bench lint clean-venv

setup: $(STAMP) browser

# The browser test drives Debian's Chromium through chromedriver (no browser download). Installed
# when missing and running as root; otherwise that one test is skipped with its reason.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null; } || \
	    echo "note: chromium/chromedriver not installed (needs root and apt); the browser test will skip"; }

# Re-runs only when the pinned set or the project metadata changed.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# NVIDIA GPUs: the CUDA 13 plugin of the locked JAX (the lock's flax imports with it). Not part
# of `make setup`: CI and the tests are CPU-only.
setup-cuda: setup
	$(PY) -m pip install -q "jax[cuda13]==$$(sed -n 's/^jax==//p' requirements.lock)"

# The demo (docs/demo.md): stage 2 on the demo corpus, stage 3 from it with ring attention over
# 2 fake CPU devices on the needle curriculum (videos of 8..32 frames), then the needle test on
# 8..128-frame videos the training never saw: table, random-guess baseline, heatmap.
DEMO := runs/demo
train: setup
	$(PY) -m vita_jax.train --config=configs/stage2.py:demo --workdir=$(DEMO)_stage2
	XLA_FLAGS="$$XLA_FLAGS --xla_force_host_platform_device_count=2" $(PY) -m vita_jax.train \
	  --config=configs/stage3.py:demo --workdir=$(DEMO) --config.init_from=$(DEMO)_stage2
	$(PY) -m vita_jax.eval.needle --model=$(DEMO) --frames=8,16,32,64,128 \
	  --depths=0,0.25,0.5,0.75,1 --samples=4 --out=$(DEMO)/needle.png

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15

# The ring-attention baseline (figure 3) is the `ringattention` package; its dependencies are
# already pinned in requirements.lock, so it is added without letting pip change them.
bench: setup
	@$(PY) -c "import importlib.metadata as m; m.version('ringattention')" 2>/dev/null || \
	  $(PY) -m pip install -q --no-deps ringattention==0.1.2
	$(PY) -m benchmarks.run $(if $(filter 1,$(QUICK)),--quick,)

lint: setup
	$(VENV)/bin/ruff check vita_jax vita_torch configs tests parity_tests benchmarks

clean-venv:
	rm -rf $(VENV)
