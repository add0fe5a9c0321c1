# Every target runs inside .venv, which is created and installed on first use (and again when
# setup.cfg, pyproject.toml or constraints.txt change), except the GPU-machine targets (gpu-check, which
# uses the machine's own python and torch). `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
NPROC ?= 2
PYTEST_ARGS ?=
# setup.cfg declares ranges; constraints.txt pins the versions developed against (torch 2.13.0: the CPU
# build on local disk here). Only the Makefile applies it, so `pip install -e .` elsewhere keeps its torch.
CONSTRAINTS ?= constraints.txt

# make test-compat: another torch from the package registry in a virtualenv of its own.
TORCH ?= 2.15.0
COMPAT_VENV := .venv-torch$(TORCH)
COMPAT_TESTS := tests/model/test_ops.py tests/trainer/parallel/test_tensor_parallel.py tests/trainer/parallel/test_bf16.py \
	tests/trainer/checkpoint/test_checkpoint.py tests/trainer/checkpoint/test_hf_interop.py tests/trainer/parallel/test_activation_checkpointing.py \
	tests/trainer/test_compat.py tests/planner/test_rehearsal.py

# make gpu-check / gpu-wheels: the GPU machine's python (with its CUDA torch) and the wheels it lacks.
GPU_PY ?= python3
GPU_WHEELS ?= gpu_wheels
GPU_PYVER ?= 3.12

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	$(PY) -m evaluation.lm_eval_plugin install  # `lm_eval --model llama_pretrain` (evaluation/lm_eval_plugin.py)
	@touch $(STAMP)

.PHONY: help install train data-demo preprocess eval finetune test test-slow test-multinode test-faults test-gpu test-compat gpu-check gpu-wheels test-all loss-compare plan plan-validate bench bench-ac bench-overlap bench-guards bench-pp bench-tokenize model-info clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project with its dev extras

train: $(STAMP)  ## train the built-in default on NPROC=2 processes with FSDP (tokenizer, shards, small LLaMA, validation, offline wandb); ARGS='k=v ...'
	$(PY) -m launch.local --nproc $(NPROC) $(ARGS)

test: $(STAMP)  ## the default test suite: fast, CPU only (what CI runs)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)  ## the slow suite (multi-node, fault injection, long runs)
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-multinode: $(STAMP)  ## multi-node training (two network-namespace nodes, a local Slurm cluster) and data preparation on Slurm: tokenization array tasks, a datatrove recipe (root; ~5 min)
	$(PY) -m pytest -m slow tests/launch/test_multinode.py tests/launch/test_preemption.py tests/launch/test_prepare_slurm.py tests/launch/test_preprocess_slurm.py $(PYTEST_ARGS)

test-faults: $(STAMP)  ## fault tolerance: preemption signal -> checkpoint -> resume, killed ranks, a hang restarted by torchrun (slow)
	$(PY) -m pytest -m slow tests/trainer/run/test_faults.py tests/trainer/run/test_watchdog.py $(PYTEST_ARGS)

test-gpu:  ## tests that need a CUDA device, run with the machine's own torch (GPU_PY=python3); fails without a GPU
	$(GPU_PY) -m launch.gpu_check --tests-only --wheels $(GPU_WHEELS) $(ARGS)

test-compat:  ## ops, TP, bf16 layouts, checkpoints, HF interop and loss-compare under another torch: make test-compat TORCH=2.11.0 (downloads it)
	@test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	@grep -v '^torch==' $(CONSTRAINTS) > $(COMPAT_VENV)/constraints.txt && echo "torch==$(TORCH)" >> $(COMPAT_VENV)/constraints.txt
	@# PIP_CONSTRAINT replaces any machine-wide constraint (this machine caps torch at its local build).
	PIP_CONSTRAINT=$(COMPAT_VENV)/constraints.txt $(COMPAT_VENV)/bin/python -m pip install --quiet \
		--disable-pip-version-check -e '.[dev]'
	$(COMPAT_VENV)/bin/python -c 'import torch; assert torch.__version__.split("+")[0] == "$(TORCH)", torch.__version__; print("torch", torch.__version__)'
	$(COMPAT_VENV)/bin/python -m pytest -m "not slow and not gpu" $(COMPAT_TESTS) $(PYTEST_ARGS)
	$(COMPAT_VENV)/bin/python -m launch.loss_compare

gpu-check:  ## on a CUDA machine (no network needed): GPU tests, bf16 trainer runs, the GPU benchmark; JSON + markdown summary (docs/gpu.md)
	$(GPU_PY) -m launch.gpu_check --wheels $(GPU_WHEELS) $(ARGS)

gpu-wheels:  ## download what gpu-check needs besides torch (hydra, omegaconf, wandb, ...) as wheels into GPU_WHEELS for Python GPU_PYVER
	python3 -m launch.gpu_wheels --dest $(GPU_WHEELS) --python-version $(GPU_PYVER)

test-all: $(STAMP)  ## every test
	$(PY) -m pytest $(PYTEST_ARGS)

data-demo: $(STAMP)  ## LLaMA's data pipeline end to end on generated samples: 7 source recipes on datatrove (local executor) -> tokenizer + shards + index (outputs/data_demo; docs/data.md)
	$(PY) -m launch.data_demo $(ARGS)

preprocess: $(STAMP)  ## clean one source on datatrove: make preprocess ARGS='preprocess=github raw_root=/data/raw [executor.kind=slurm ...]'
	$(PY) -m launch.preprocess $(ARGS)

finetune: $(STAMP)  ## instruction-finetune make train's newest checkpoint on the built-in synthetic instructions (packed, document-masked, loss on responses) and print held-out exact match before/after (docs/finetuning.md); ARGS='--init-from <dir> optim.lr=...'
	$(PY) -m launch.finetune --nproc $(NPROC) $(ARGS)

# Every demo task: one per layout and scorer of the report card (evaluation/demo.py, evaluation/demo_report.py).
EVAL_DEMOS := stdlib_next_line,stdlib_import,stdlib_text,demo_siqa,demo_race,demo_mmlu,demo_nq_open,demo_gsm8k,demo_gsm8k_maj,demo_math_maj,demo_humaneval,demo_mbpp,demo_crows_pairs,demo_winogender,demo_truthfulqa_mc2,demo_realtoxicityprompts

eval: $(STAMP)  ## evaluate the newest checkpoint under outputs/ (make train's) on every demo task (their programs run sandboxed), print the report; ARGS='checkpoint=<dir> eval.tasks=[...]'
	$(PY) -m launch.evaluate 'eval.tasks=[$(EVAL_DEMOS)]' eval.allow_code_execution=true $(ARGS)

plan: $(STAMP)  ## plan a cluster run without a GPU: memory per GPU, step time, GPU-hours, carbon (docs/planner.md); ARGS='model=llama1_65b cluster.gpus=2048 parallel.tp=8 [--search]'
	$(PY) -m launch.plan $(ARGS)

plan-validate: $(STAMP)  ## the planner against published runs (LLaMA, and pipelined torchtitan, Llama 3, Megatron-LM): calibrate, predict, table of errors (~8-11 min)
	$(PY) -m planner.validate --json bench/results/planner_validation.json

loss-compare: $(STAMP)  ## train the debug model under every parallel layout (1-4 processes) and compare losses/weights
	$(PY) -m launch.loss_compare $(ARGS)

bench: $(STAMP)  ## benchmark: our trainer (AC none/selective/full, compile) vs a bare loop vs HF transformers, MFU, 1->2 process scaling (~20 min; docs/benchmarks.md)
	$(PY) -m bench.train_speed $(ARGS)

bench-ac: $(STAMP)  ## benchmark: activation-checkpointing policies side by side (step time, kept bytes; ~10 min)
	$(PY) -m bench.ac_policies $(ARGS)

bench-overlap: $(STAMP)  ## benchmark: communication overlap on vs off at 2 processes, TP 2 and FSDP 2 (~5 min)
	$(PY) -m bench.overlap $(ARGS)

bench-guards: $(STAMP)  ## benchmark: wall time per step with every run guard (spike, watchdog, straggler, goodput) on vs off (~5 min)
	$(PY) -m bench.guards $(ARGS)

bench-pp: $(STAMP)  ## benchmark: pipeline bubble measured vs theory per schedule (GPipe, 1F1B, interleaved, zero-bubble ZB1P and ZBV; compile on/off) at pp 2 and 4, and step time vs one process (~10 min; docs/pipeline.md)
	$(PY) -m bench.pipeline $(ARGS)

bench-tokenize: $(STAMP)  ## benchmark: our shard writer vs sentencepiece's raw encode, tokens/s per core (~1 min; docs/data.md)
	$(PY) -m bench.tokenize_speed $(ARGS)

model-info: $(STAMP)  ## parameter counts and FLOPs of a preset: make model-info ARGS=model=llama1_7b
	$(PY) -m launch.model_info $(ARGS)

clean:  ## remove run outputs and the data cache (keeps .venv)
	rm -rf outputs multirun cache wandb .pytest_cache gpu_check
