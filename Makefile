# `make demo` and `make test` each set up .venv on first use (torch==2.13.0 first: a CPU wheel),
# then run. PYTHON picks the interpreter the venv is made from.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/hf-fwdattr demo --output-dir runs/demo

test: install
	$(BIN)/python -m pytest
