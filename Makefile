# The two commands of the README: `make quickstart` and `make test`.
# Both create .venv if it is missing and install what they need into it.

# The first interpreter that runs and is 3.11+ (a pyenv shim may exist and still fail).
ifndef PYTHON
PYTHON := $(shell for p in python3 python3.13 python3.12 python3.11; do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; done)
endif
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch, installed before transformers so that pip does not fetch a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The tested versions of every dependency (see its header).
CONSTRAINTS := constraints.txt
WORKDIR ?= workdirs/quickstart
# Test processes (pytest-xdist): the suite is mostly single-threaded compilation, so two
# workers on two cores take about half the time of one.
TEST_WORKERS ?= 2

.PHONY: quickstart test clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "vitjax needs Python 3.11+ (python3 --version); set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: setup.py $(CONSTRAINTS) $(VENV)/.installed
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/python -m vitjax.train --config configs/quickstart.py --workdir $(WORKDIR)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=20 tests

clean:
	rm -rf $(VENV) workdirs
