# `make test` is the project's test command (CI runs it through .ci/run).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-slow bench clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fast suite (CPU only). Slow tests (full-size models) are marked `slow`: run them with `make test-slow`.
test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

bench: install
	$(PY) benchmarks/unet.py

clean:
	rm -rf $(VENV) build *.egg-info
