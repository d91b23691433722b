# make demo: set up .venv and run the main MovieLens job; make test: set up and run lint + tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: setup demo test lint format bench clean

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
