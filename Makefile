# gpt2-steps. Every target works as the first command on a fresh clone: those that need .venv make it first.
#   make list              the steps and their lessons
#   make step N=08         run a stage (ARGS="--max-steps 60 --device cpu" passes flags to it)
#   make step N=16 NPROC=2 a stage on 2 processes (torchrun), from step 16 on
#   make curves ARGS="runs/13_vocab_50304 runs/14_gpt3_hparams"
#                          the loss curves of several runs in one picture (runs/curves.svg)
#   make test [N=08]       the whole test suite, or one stage's tests
#   make bench             the speed ladder of steps 10-16 (ARGS="--steps 10,15" for some, "--steps all" for all)
#   make data              text to token shards for steps 17 and 18
#                          (ARGS="--source fineweb-edu --out data/edu_fineweb10B")
#   make gpu-check         every accelerator path in one command, with one summary (on a CPU: says so, exits 0)
#   make diff N=08         what step 08 adds to step 07
#   make mistake [N=08] [M=untied-head]
#                          the classic mistakes (N=08: those in step 08's code); M=: one made in a copy of a step,
#                          and its tests run
#   make book              the steps as a site to read in a browser (book/index.html)
#   make setup [CPU=1]     create .venv and install the pinned dependencies (CPU=1: torch's CPU build)
#   make clean             remove .venv, runs/, book/ and hypothesis's cache (data/ stays: it took long to make)
#   make help              this list of commands
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REGISTRY := $(PYTHON) -m shared.steps
# ARGS as the shell splits it ("--prompt 'To be'": two words), into "$$@". Read from the environment, not pasted
# into the recipe: a quote left open is one line, not a broken recipe. Taken as typed: make would expand a $ in it
# (from a terminal, ARGS="--prompt 'cost \$5'" would reach the step as 'cost ').
ARGS_FROM := $(origin ARGS)
override ARGS := $(value ARGS)
export ARGS
ARGV = eval "set -- $$ARGS" 2>/dev/null || exec $(REGISTRY) bad-args

TARGETS := help list setup step curves test bench data gpu-check mistake book diff clean
.PHONY: $(TARGETS)
# `make step N=01 ARGS=--max-steps 10` makes 10 a goal of its own: say so before the step runs without it
ifneq ($(filter-out $(TARGETS) $(STAMP),$(MAKECMDGOALS)),)
$(error "$(firstword $(filter-out $(TARGETS) $(STAMP),$(MAKECMDGOALS)))" is not a target (make help \
lists them); if it is a word of ARGS, put ARGS in quotes, whole, e.g. ARGS="--max-steps 10 --seed 0")
endif
# these take no flags: ARGS="--help" or a typo given to them is said, not silently dropped (an ARGS exported for the
# steps is left alone)
NO_ARGS := $(filter help list setup diff clean,$(or $(MAKECMDGOALS),list))
ifneq ($(and $(filter command line,$(ARGS_FROM)),$(ARGS),$(NO_ARGS)),)
$(error make $(firstword $(NO_ARGS)) takes no ARGS (make help says what each command does))
endif
.DEFAULT_GOAL := list

list:
	@$(REGISTRY) list

help:
	@sed -n 's/^#   //p' Makefile

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

# NPROC=4: four processes under torchrun (shared/launch.py), for the steps that share the work (16 on).
step: $(STAMP)
	@$(ARGV); s=$$($(REGISTRY) resolve "$(N)") && if [ -z "$(NPROC)" ]; then $(PY) -m steps.$$s "$$@" || { r=$$?; \
	[ $$r -ne 137 ] || echo "make step: the run was killed (SIGKILL, exit 137), most often by the kernel when memory" \
	"runs out (its log says so: sudo dmesg), which leaves the run no word of its own: make the run smaller" >&2; \
	exit $$r; }; \
	elif ! grep -q init_process_group steps/$$s/__main__.py; then \
	echo "error: step $$s runs as one process; NPROC is for step 16 (16_ddp) and later" >&2; exit 2; \
	elif ! [[ "$(NPROC)" =~ ^[1-9][0-9]*$$ ]]; then echo "error: NPROC=$(NPROC) is not a number of processes" >&2; exit 2; \
	else $(PY) -m shared.launch $(NPROC) steps.$$s "$$@"; fi

# The whole suite: one test process per CPU, at most 4 (pytest-xdist), each on one thread (tests/conftest.py); a
# file's tests stay in one process, so the runs they share are made once. One stage's tests: one process, where
# -s shows what a test prints (ARGS="-n 0 -s" for the whole suite). Where the machine sets PYTHONDONTWRITEBYTECODE,
# the suite writes compiled modules anyway (__pycache__/, ignored by git): each of the many processes it starts would
# otherwise compile the project's modules, and pytest its test files, afresh (about a fifth of the suite's time:
# 5 min 32 s against 4 min 37 s on a 2-core machine that sets it, README's Notes).
WORKERS = $(shell $(PYTHON) -c "import os; print(min(4, os.cpu_count() or 1))")  # each holds torch, some a 124M model
test: $(STAMP)
	@$(ARGV); unset PYTHONDONTWRITEBYTECODE; \
	if [ -n "$(N)" ]; then s=$$($(REGISTRY) resolve "$(N)") && $(PY) -m pytest --step $$s "$$@"; \
	else $(PY) -m pytest -n $(WORKERS) --dist loadfile "$$@"; fi

curves: $(STAMP)
	@$(ARGV); $(PY) -m shared.curves "$$@"

bench: $(STAMP)
	@$(ARGV); $(PY) -m shared.bench "$$@"

data: $(STAMP)
	@$(ARGV); $(PY) -m shared.shards "$$@"

gpu-check: $(STAMP)
	@$(ARGV); $(PY) -m shared.gpu_check "$$@"

mistake: $(STAMP)
	@$(ARGV); $(PY) -m shared.mistakes $(if $(M),--id $(M)) $(if $(N),--step $(N)) "$$@"

book: $(STAMP)
	@$(ARGV); $(PY) -m shared.book "$$@"

# The file headers without their times (they are the clone's, not the lesson's); in colour on a terminal.
diff:
	@s=$$($(REGISTRY) resolve "$(N)") && p=$$($(REGISTRY) prev $$s) || exit 2; c=never; [ -t 1 ] && c=always; \
	{ diff -ruN -x __pycache__ --color=$$c steps/$$p steps/$$s | sed -E -e "s/ -x __pycache__ '--color=$$c'//" \
	-e $$'/^(.\\[1m)?(---|\\+\\+\\+) /s/\t[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]+ [+-][0-9]{4}//'; \
	r=$${PIPESTATUS[0]}; [ $$r -le 1 ] || [ $$r -eq 141 ]; } && $(REGISTRY) brought $$s  # 141: | head had enough

clean:
	rm -rf $(VENV) runs book .hypothesis
