# `make test` and `make demo` set themselves up from nothing: a virtual environment in .venv,
# the package installed into it with the extras they need, then the run.
#
# `make test` is the tested matrix. Every stack leaves out tests marked `slow` (the larger server
# and worker matrices); `make test-all` runs everything, slow ones included, on every stack.
#
#   stack                         venv            what runs
#   this Python (3.11), SA 2.1    .venv           lint (ruff, mypy), `make docs`, the whole suite
#   Python 3.10, SQLAlchemy 2.0   .venv-compat    the whole suite (the oldest supported stack),
#                                                 with the guard's checks in Python, not C
#                                                 (SESSIONSCOPE_NO_EXTENSIONS=1)
#   Python 3.12, SQLAlchemy 2.1   .venv-py3.12    the suite but MATRIX_SLICE, on 2 workers
#   Python 3.13, SQLAlchemy 2.1   .venv-py3.13    the suite but MATRIX_SLICE, on 2 workers
#
# 3.12 and 3.13 run a slice to keep `make test` within budget on 2 cores: every test that runs in
# the test process (units, registries, scopes, the guard, shipping, fan-out, the integrations under
# test clients, the docs' examples: about 1,580 of 1,760 tests), but not the modules that start
# servers, workers or whole programs in subprocesses (gunicorn, uvicorn, Celery workers, the demo,
# the audit command, the benchmarks' smoke runs; they exercise the servers more than the Python,
# and run on 3.10 and 3.11). The slice runs under pytest-xdist with 2 workers (MATRIX_XDIST; each
# worker has its own PostgreSQL schema and SQLite files): about 2 minutes each instead of 4.
# `make test-all` runs the whole suite on 3.12 and 3.13 too, one process each.
#
# Each Python is found on the PATH (pythonX.Y) or under pyenv. One that is missing is SKIPPED with a
# loud banner; under CI=true a missing one fails `make test` (CI machines must have all four).
# Every extra has wheels for 3.10-3.13 (gevent, eventlet, uvloop, asyncpg, psycopg[binary], ...):
# all four stacks install the same `test` extra.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# what an install builds from: a change to any of them reinstalls (the C extension is rebuilt)
BUILD_INPUTS := pyproject.toml setup.py src/sessionscope/_speedups.c src/sessionscope/_frames.c \
                src/sessionscope/_guard_setup.c src/sessionscope/_work_state.c \
                src/sessionscope/_fields.h
CKSUM  := $(shell cat $(BUILD_INPUTS) | cksum | cut -d' ' -f1)
STAMP  := $(VENV)/.installed-$(CKSUM)

# Python X.Y: the real interpreter, not a pyenv shim that exists but refuses to run
find_python = $(firstword $(shell python$(1) -c 'import sys; print(sys.executable)' 2>/dev/null) \
                          $(wildcard $(HOME)/.pyenv/versions/$(1).*/bin/python$(1)))
PYTHON_COMPAT ?= $(call find_python,3.10)
PYTHON_3.12   ?= $(call find_python,3.12)
PYTHON_3.13   ?= $(call find_python,3.13)
COMPAT_VENV   := .venv-compat
COMPAT_STAMP  := $(COMPAT_VENV)/.installed-$(CKSUM)
MATRIX        := 3.12 3.13

# what 3.12 and 3.13 leave out (see above); `make test-all` empties it
MATRIX_SLICE ?= $(addprefix --ignore=tests/,test_wsgi_gunicorn.py test_asgi_uvicorn.py \
                  test_fastapi_uvicorn.py test_asgi_frameworks.py test_green_frameworks.py \
                  test_celery.py test_demo.py test_audit.py test_pytest_audit.py \
                  test_benchmarks_smoke.py test_package.py)
MATRIX_XDIST ?= -n 2

# a stack whose Python is missing: a loud skip here, a failure under CI
skipped = echo; echo "********************************************************************"; \
          echo "** $@ SKIPPED: no Python $(1) on this machine ($(2) untested)"; \
          echo "********************************************************************"; echo; \
          if [ "$$CI" = true ]; then echo "CI=true: every Python of the matrix is required"; exit 1; fi

.PHONY: test test-all test-newest test-compat $(addprefix test-py,$(MATRIX)) docs dist demo bench \
        lint venv clean

# `make test` selects the representative slice; `make test-all` overrides the selection
MARKERS ?= not slow

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python $(BUILD_INPUTS)
	$(BIN)/python -m pip install --quiet -e '.[test,demo,dev]'
	# gunicorn 23.0 dropped the eventlet worker: the eventlet server tests run this one, apart
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/gunicorn-eventlet 'gunicorn==23.0.0'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

test: test-newest test-compat $(addprefix test-py,$(MATRIX))

test-all:
	$(MAKE) test MARKERS="" MATRIX_SLICE="" MATRIX_XDIST=""

test-newest: lint docs
	$(BIN)/python -m pytest -q -m "$(MARKERS)" $(PYTEST_ARGS)

$(COMPAT_STAMP): $(BUILD_INPUTS)
	$(PYTHON_COMPAT) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet -e '.[test]' 'SQLAlchemy>=2.0.22,<2.1'
	rm -f $(COMPAT_VENV)/.installed-* && touch $@

ifeq ($(PYTHON_COMPAT),)
test-compat:
	@$(call skipped,3.10,Python 3.10 + SQLAlchemy 2.0)
else
test-compat: $(COMPAT_STAMP)
	@echo "== again on the oldest supported stack: Python 3.10, SQLAlchemy 2.0, the guard's checks in Python =="
	SESSIONSCOPE_NO_EXTENSIONS=1 $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "$(MARKERS)" $(PYTEST_ARGS)
endif

# Python 3.12 and 3.13 with the newest SQLAlchemy, the suite but MATRIX_SLICE
.venv-py%/.installed-$(CKSUM): $(BUILD_INPUTS)
	$(PYTHON_$*) -m venv .venv-py$*
	.venv-py$*/bin/python -m pip install --quiet --upgrade pip
	.venv-py$*/bin/python -m pip install --quiet -e '.[test]'
	rm -f .venv-py$*/.installed-* && touch $@

$(addprefix test-py,$(MATRIX)): test-py%:
	@if [ -z "$(PYTHON_$*)" ]; then $(call skipped,$*,Python $* + SQLAlchemy 2.1); else \
	  $(MAKE) --no-print-directory .venv-py$*/.installed-$(CKSUM) && \
	  echo "== on Python $*, SQLAlchemy 2.1 ($(if $(MATRIX_SLICE),the suite but the server and worker modules,the whole suite)) ==" && \
	  .venv-py$*/bin/python -m pytest -q -p no:cacheprovider -m "$(MARKERS)" $(MATRIX_XDIST) \
	    $(MATRIX_SLICE) \
	    $(PYTEST_ARGS); fi

# the documentation site: docs/*.md (MyST) into docs/_build/html; warnings, broken references
# and links between pages (-n) are errors. From scratch (-E) every time, about 20 s.
docs: $(STAMP)
	$(BIN)/python -m sphinx -E -n -W --keep-going -q -b html docs docs/_build/html

# the sdist and the wheel, into dist/, checked as PyPI would (tests/test_package.py installs one)
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

demo: $(STAMP)
	$(BIN)/python -m sessionscope demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(addprefix .venv-py,$(MATRIX)) .pytest_cache .ruff_cache \
	  .mypy_cache docs/_build dist build
