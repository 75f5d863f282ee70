# gpt2-steps. Every target works as the first command on a fresh clone: it makes .venv when missing.
#   make list              the steps and their lessons
#   make step N=08         run a stage (ARGS="--max-steps 60 --device cpu" passes flags to it)
#   make test [N=08]       the whole test suite, or one stage's tests
#   make diff N=08         what step 08 adds to step 07
#   make setup [CPU=1]     create .venv and install the pinned dependencies (CPU=1: torch's CPU build)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REGISTRY := $(PYTHON) -m shared.steps

.PHONY: list setup step test diff clean
.DEFAULT_GOAL := list

list:
	@$(REGISTRY) list

setup: $(STAMP)

# Every dependency is pinned (pyproject.toml), so a learner runs what the diary measured. On Linux, PyPI's
# torch wheel is the CUDA build and brings several GB of nvidia-* packages with it, GPU or not.
# `make setup CPU=1` (on a fresh clone, or after `make clean`) first takes the CPU build from PyTorch's index.
# pip also looks wherever it is configured to (find-links): a torch wheel already on disk installs offline.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(CPU),$(PY) -m pip install --quiet --index-url $(TORCH_CPU_INDEX) $$($(REGISTRY) deps torch))
	$(PY) -m pip install --quiet $$($(REGISTRY) deps)
	@touch $@

step: $(STAMP)
	@s=$$($(REGISTRY) resolve "$(N)") && $(PY) -m steps.$$s $(ARGS)

test: $(STAMP)
	@if [ -n "$(N)" ]; then s=$$($(REGISTRY) resolve "$(N)") && $(PY) -m pytest --step $$s $(ARGS); \
	else $(PY) -m pytest $(ARGS); fi

diff:
	@s=$$($(REGISTRY) resolve "$(N)") && p=$$($(REGISTRY) prev $$s) && \
	{ diff -ru -x __pycache__ --color=auto steps/$$p steps/$$s; test $$? -le 1; }

clean:
	rm -rf $(VENV) runs .hypothesis
