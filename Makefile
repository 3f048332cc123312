# vvireid developer commands. `make test` and `make demo` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test test-fast lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Run the whole test suite (installs everything it needs first).
test: $(STAMP)
	$(PY) -m ruff check model training indexer server tests benchmarks scripts
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check model training indexer server tests benchmarks scripts

## Synthetic data -> train -> evaluate -> index -> serve on http://127.0.0.1:8000 (CPU, minutes).
demo: $(STAMP)
	$(PY) -m scripts.demo

bench: $(STAMP)
	$(PY) benchmarks/encode.py
	$(PY) benchmarks/search.py

clean:
	rm -rf .demo .pytest_cache
