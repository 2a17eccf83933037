# `make demo` and `make test` each do all the set-up they need on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch (a local file on our machines); an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
DEMO_IMAGE := sample_images/cat.jpg

.PHONY: install test test-zoo demo lint docs bench clean

install: $(BIN)/fmap

$(BIN)/fmap: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(BIN)/fmap

test: install
	$(BIN)/python -m pytest

# Optional: one model of every torchvision family and a few timm models through `fmap layers` and
# `fmap extract --verify`, checked against an independent recomputation (tests/test_zoo.py), and receptive
# fields against published values and a NaN probe (tests/test_zoo_fields.py); `make test` skips them.
# Needs a venv where torchvision and timm import beside the CPU torch, made by ZOO_SETUP.
ZOO_VENV := .venv-zoo
ZOO_SETUP ?= ../shared/tools/zoo-venv.sh

test-zoo:
	@[ -x $(ZOO_VENV)/bin/python ] || $(ZOO_SETUP) $(ZOO_VENV)
	$(ZOO_VENV)/bin/python -m pytest tests/test_zoo.py tests/test_zoo_fields.py -v -s -p no:cacheprovider --durations=0

demo: install
	$(BIN)/fmap extract $(DEMO_IMAGE) --layers conv1,conv2 -o demo.h5 --overwrite
	$(BIN)/fmap inspect demo.h5

lint: install
	$(BIN)/ruff check fmap_cli tests scripts
	$(BIN)/ruff format --check fmap_cli tests scripts
	$(BIN)/mypy

# bench_capture.py measures issue 10's torchvision models only where torchvision imports:
# .venv-zoo/bin/python scripts/bench_capture.py (here it says so and measures the replicas of tests/zoo.py).
bench: install
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_capture.py
	$(BIN)/python scripts/bench_pipeline.py
	$(BIN)/python scripts/bench_project.py
	$(BIN)/python scripts/bench_occlude.py
	$(BIN)/python scripts/bench_sizes.py

docs: install
	$(BIN)/python scripts/sync_readme.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo.h5
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
