# gpt2-steps. Every target works as the first command on a fresh clone: it makes .venv when missing.
#   make list              the steps and their lessons
#   make step N=08         run a stage (ARGS="--max-steps 60 --device cpu" passes flags to it)
#   make test [N=08]       the whole test suite, or one stage's tests
#   make diff N=08         what step 08 adds to step 07
#   make setup             create .venv and install the pinned dependencies
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

# torch is pinned (pyproject.toml): an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
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
