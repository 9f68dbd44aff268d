# Quick start: `make demo` (SFT then DPO on the embedded task, offline, CPU) and `make test`.
# Each creates the virtual environment it needs in .venv on first use.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The CPU build of torch that installs from this pin; on a GPU machine use e.g. `make TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: demo test lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

demo: venv
	PYTHON=$(PYTHON) scripts/sft_then_dpo.sh

# the linter and formatter settings are in pyproject.toml (line length 120)
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf $(VENV)
