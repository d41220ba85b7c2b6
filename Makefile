# `make test` and `make demo` set themselves up from nothing: a virtual environment in .venv,
# the package installed into it with the extras they need, then the run.
#
# `make test` runs lint, types and the suite on the newest supported stack (this Python,
# SQLAlchemy 2.1), then again on the oldest (Python 3.10, SQLAlchemy 2.0) in .venv-compat, when a
# Python 3.10 is on the machine. It leaves out tests marked `slow` (the larger server and worker
# matrices); `make test-all` runs everything, slow ones included.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

# the real interpreter, not a pyenv shim that exists but refuses to run
PYTHON_COMPAT ?= $(firstword $(shell python3.10 -c 'import sys; print(sys.executable)' 2>/dev/null) \
                             $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10))
COMPAT_VENV   := .venv-compat
COMPAT_STAMP  := $(COMPAT_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test test-all test-newest test-compat demo bench lint venv clean

# `make test` selects the representative slice; `make test-all` overrides the selection
MARKERS ?= not slow

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,demo,dev]'
	# gunicorn 23.0 dropped the eventlet worker: the eventlet server tests run this one, apart
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/gunicorn-eventlet 'gunicorn==23.0.0'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

test: test-newest test-compat

test-all:
	$(MAKE) test MARKERS=""

test-newest: lint
	$(BIN)/python -m pytest -q -m "$(MARKERS)" $(PYTEST_ARGS)

$(COMPAT_STAMP): pyproject.toml
	$(PYTHON_COMPAT) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet -e '.[test]' 'SQLAlchemy>=2.0.22,<2.1'
	rm -f $(COMPAT_VENV)/.installed-* && touch $@

ifeq ($(PYTHON_COMPAT),)
test-compat:
	@echo "test-compat SKIPPED: no Python 3.10 on this machine (Python 3.10 + SQLAlchemy 2.0 untested)"
else
test-compat: $(COMPAT_STAMP)
	@echo "== again on the oldest supported stack: Python 3.10, SQLAlchemy 2.0 =="
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "$(MARKERS)" $(PYTEST_ARGS)
endif

demo: $(STAMP)
	$(BIN)/python -m sessionscope demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache .ruff_cache .mypy_cache
