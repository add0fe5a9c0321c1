# Every target runs inside .venv, which is created and installed on first use (and again when
# setup.cfg or pyproject.toml change). `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
NPROC ?= 2
PYTEST_ARGS ?=
NPROC ?= 2

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

.PHONY: help install train test test-slow test-multinode test-faults test-gpu test-all loss-compare bench bench-ac bench-overlap model-info clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project with its dev extras

train: $(STAMP)  ## train the built-in default on NPROC=2 processes with FSDP (tokenizer, shards, small LLaMA, validation, offline wandb); ARGS='k=v ...'
	$(PY) -m launch.local --nproc $(NPROC) $(ARGS)

test: $(STAMP)  ## the default test suite: fast, CPU only (what CI runs)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)  ## the slow suite (multi-node, fault injection, long runs)
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-multinode: $(STAMP)  ## multi-node training: two network-namespace nodes, and a local Slurm cluster (root; ~3 min)
	$(PY) -m pytest -m slow tests/launch/test_multinode.py tests/launch/test_preemption.py $(PYTEST_ARGS)

test-faults: $(STAMP)  ## fault tolerance: preemption signal -> checkpoint -> resume, killed ranks (slow)
	$(PY) -m pytest -m slow tests/trainer/test_faults.py $(PYTEST_ARGS)

test-gpu: $(STAMP)  ## tests that need a CUDA device (and flash-attn where marked)
	$(PY) -m pytest -m "gpu" $(PYTEST_ARGS)

test-all: $(STAMP)  ## every test
	$(PY) -m pytest $(PYTEST_ARGS)

loss-compare: $(STAMP)  ## train the debug model under every parallel layout (1-4 processes) and compare losses/weights
	$(PY) -m launch.loss_compare $(ARGS)

bench: $(STAMP)  ## benchmark: our trainer (AC none/selective/full, compile) vs a bare loop vs HF transformers, MFU, 1->2 process scaling (~20 min; docs/benchmarks.md)
	$(PY) -m bench.train_speed $(ARGS)

bench-ac: $(STAMP)  ## benchmark: activation-checkpointing policies side by side (step time, kept bytes; ~10 min)
	$(PY) -m bench.ac_policies $(ARGS)

bench-overlap: $(STAMP)  ## benchmark: communication overlap on vs off at 2 processes, TP 2 and FSDP 2 (~5 min)
	$(PY) -m bench.overlap $(ARGS)

model-info: $(STAMP)  ## parameter counts and FLOPs of a preset: make model-info ARGS=model=llama1_7b
	$(PY) -m model.info $(ARGS)

clean:  ## remove run outputs and the data cache (keeps .venv)
	rm -rf outputs multirun cache wandb .pytest_cache
