# Everything a newcomer needs: `make demo` (train on a shipped dataset) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch is pinned here (not in pyproject) so that a bare set-up does not
# pull a multi-GB CUDA build; GPU users install their own torch first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test test-all lint demo bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,demo]"
	-$(PIP) install -q "singd==0.0.5"  # optional test oracle; tests skip without it
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check singd_functional tests benchmarks

## The default test suite (what CI runs): lint, then every test not marked slow.
test: $(STAMP) lint
	$(PY) -m pytest -n 2 -m "not slow" --timeout=900 -q

## Also the slow tests.
test-all: $(STAMP)
	$(PY) -m pytest -n 2 --timeout=1800 -q

demo: $(STAMP)
	$(PY) -m singd_functional.demo $(ARGS)

bench: $(STAMP)
	$(PIP) install -q -e ".[bench]"
	$(PY) -m benchmarks.run $(ARGS)

bench-quick: $(STAMP)
	$(PIP) install -q -e ".[bench]"
	$(PY) -m benchmarks.run --quick $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
