# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU torch from this machine's registry; GPU clusters install their CUDA torch and skip constraints.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
export TOKENIZERS_PARALLELISM ?= false

.PHONY: env demo test lint format clean

env: $(VENV)/.installed

# Torch first (an unpinned torch would pull a CUDA build), DeepSpeed next (it builds against the
# installed torch, so no build isolation), then the project; the torchvision patch only acts on CPU torch.
$(VENV)/.installed: pyproject.toml constraints.txt tools/patch_torchvision_cpu.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt --no-build-isolation "deepspeed>=0.19.8"
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PY) tools/patch_torchvision_cpu.py
	touch $@

demo: env
	$(PY) -m moderator.tiny $(DEMO_DIR)/base
	$(PY) -m moderator.images $(DEMO_DIR)/safemt --copy-from tests/data/safemt_sample
	$(PY) -m moderator.inference --model $(DEMO_DIR)/base --safemt-file $(DEMO_DIR)/safemt/4_turn.json --limit 3
	@echo "demo: tiny base model in $(DEMO_DIR)/base, SafeMT sample with placeholder images in $(DEMO_DIR)/safemt"

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: env
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(DEMO_DIR)
