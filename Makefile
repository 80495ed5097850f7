# `make test` is the project's test command (CI runs it through .ci/run).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
WORKDIR ?= demo_out

.PHONY: install test test-slow bench demo clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fast suite (CPU only). Slow tests (full-size models) are marked `slow`: run them with `make test-slow`.
# Two pytest-xdist workers, one per test file at a time (the longest files first: tests/conftest.py),
# sharing one persistent compilation cache.
XDIST ?= -n 2 --dist loadfile
test: install
	$(PY) -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS) tests

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

# The toy world's end to end demo (configs/toy.py): report in $(WORKDIR)/report/index.html.
demo: install
	$(PY) -m fnf_jax.main --config=configs/toy.py --workdir=$(WORKDIR)

bench: install
	$(PY) benchmarks/unet.py

clean:
	rm -rf $(VENV) build *.egg-info
