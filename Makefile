# Everything a newcomer needs: `make demo` (train on a shipped dataset), `make test` and
# `make docs` (the documentation site, into site/).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch is pinned here (not in pyproject) so that a bare set-up does not
# pull a multi-GB CUDA build; GPU users install their own torch first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
ORACLE_WARNING := WARNING: the official oracle singd==0.0.5 is NOT installed: \
tests/test_official_oracle.py will be SKIPPED (pip install singd==0.0.5 to run it)

.PHONY: venv test test-all lint typecheck docs oracle-check demo bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,demo,docs]"
	@# the official package is the external test oracle: say so loudly when it is missing
	$(PIP) install -q "singd==0.0.5" || echo "$(ORACLE_WARNING)" >&2
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check singd_functional tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy

## The documentation site (strict: a broken reference or a docstring warning fails).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

oracle-check: $(STAMP)
	@$(PY) -c "import singd" 2>/dev/null || echo "$(ORACLE_WARNING)" >&2

## The default test suite (what CI runs): lint, types, the docs build, then every test
## not marked slow.
test: $(STAMP) lint typecheck docs oracle-check
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
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .ruff_cache .mypy_cache
