# vvireid developer commands. `make test` and `make demo` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test lint demo bench clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# milvus-lite depends on faiss-cpu, which installs the same `faiss` module: put faiss-gpu's back.
	$(PY) -m pip install --quiet --force-reinstall --no-deps faiss-gpu
	touch $(STAMP)

## Run the whole test suite (installs everything it needs first, chromium for the browser test).
test: $(STAMP) browser
	$(PY) -m ruff check model training indexer server tests benchmarks scripts
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check model training indexer server tests benchmarks scripts
	$(VENV)/bin/lint-imports

## Synthetic data -> train -> evaluate -> index -> serve on http://127.0.0.1:8000 (CPU, minutes).
demo: $(STAMP)
	$(PY) -m scripts.demo

bench: $(STAMP)
	$(PY) benchmarks/encode.py
	$(PY) benchmarks/search.py

clean:
	rm -rf .demo .pytest_cache

## Debian's chromium for the web-page test (best effort: without it that one test is skipped).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }
