# One command each: `make demo` (set up everything, run the main job) and
# `make test` (set up everything, pass the tests). CI runs `make check test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME ?= $(or $(CODECAGE_RUNTIME),/var/lib/codecage/runtime)
export CODECAGE_RUNTIME := $(RUNTIME)
STAMP := $(VENV)/.installed

.PHONY: all demo test test-full test-slow check bench runtime backends clean e2b-suite

all: test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e '.[dev,service,cluster,bwrap,container]' 2>&1 | grep -v 'is ignored: it is neither' || true
	$(BIN)/python -c 'import codecage, pydantic, pytest'
	touch $@

runtime:
	scripts/build-runtime $(RUNTIME)

demo: $(STAMP) runtime
	$(BIN)/python examples/demo.py

# What the gvisor/container backends need (apt packages, the sandbox image); their tests
# skip, saying why, where this cannot be had (no root, no apt); a failed build stops `make test`.
backends: $(STAMP) runtime
	scripts/install-backends
	$(BIN)/codecage image build
	$(BIN)/python -c 'from tests import engine; engine.start(); engine.stop()'  # the engine's image
	$(BIN)/codecage vm build  # the full-VM level's guest kernel, initramfs and root
	$(BIN)/codecage vm probe  # which accelerator its guests get (kept for the doctor)

# -n 3: three pytest-xdist workers (the suite mostly waits on sandboxes: starts, timeouts,
# kills), each taking work from the others when it runs out (worksteal: no idle tail); --durations: the slowest tests, for keeping CI in its budget. PYTEST_WORKERS=0
# runs it in one process.
PYTEST_WORKERS ?= 3
test: $(STAMP) runtime backends
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=30

# Every case of every conformance test on every backend (`make test` runs one case of each
# parametrized one on the backends other than the default: tests/conftest.py).
test-full:
	CODECAGE_FULL_MATRIX=1 $(MAKE) test

# The same: the whole conformance kit on the full-VM level too (an hour and more under TCG).
test-slow: test-full

# The unit layer needs no privilege: as root it runs with every capability dropped.
UNPRIVILEGED := $(if $(filter 0,$(shell id -u)),setpriv --inh-caps=-all --bounding-set=-all,)
check: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy
	$(UNPRIVILEGED) $(BIN)/pytest tests/unit -q -n 2  # two workers: half its time is waiting

bench: $(STAMP) runtime
	$(BIN)/pip install --quiet --progress-bar off -e '.[dev,service,cluster,bwrap,container,bench]' 2>&1 | grep -v 'is ignored: it is neither' || true
	$(BIN)/python benchmarks/run.py

# E2B's own Python tests against codecage (docs/e2b.md): `make e2b-suite E2B=path/to/checkout`
# (of github.com/e2b-dev/E2B or e2b-dev/code-interpreter; GROUPS= picks test directories).
E2B_VENV := .venv-e2b
e2b-suite: $(STAMP)
	@test -n "$(E2B)" || { echo "usage: make e2b-suite E2B=path/to/checkout [GROUPS=...]"; exit 2; }
	test -x $(E2B_VENV)/bin/python || $(PY) -m venv $(E2B_VENV)
	$(E2B_VENV)/bin/pip install --quiet --progress-bar off -e '.[service,e2b-suite]' 2>&1 | grep -v 'is ignored: it is neither' || true
	$(E2B_VENV)/bin/python scripts/e2b-suite $(E2B) $(GROUPS)

clean:
	rm -rf $(VENV) $(E2B_VENV) demo-output .pytest_cache .mypy_cache
