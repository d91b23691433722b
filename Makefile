# make demo: set up .venv and run the main MovieLens job; make test: set up and run lint + tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: setup demo test lint format bench device-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m mtl.data.fetch movielens-100k
	$(BIN)/python experiments/movielens.py --config=experiments/movielens.py:quick

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q -n $(JOBS) --durations=15

bench: setup
	$(BIN)/python -m pip install -q torch==2.13.0 'torchjd[quadprog_projector]' || echo "peers not installed: the benchmark will say why it skips them"
	$(BIN)/python experiments/benchmark.py

# TorchJD and its QP solvers as Python 3.12 wheels for an accelerator host without network (the
# workplace's GPU machine has JAX, PyTorch, numpy and scipy): experiments/device_bench.sh installs them
device-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl torchjd==0.18.0 quadprog==0.1.14 qpsolvers==4.13.0

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
