# coattn-vqa — every target installs what it needs first (`.venv` from uv.lock).
# Hydra overrides go in ARGS, e.g. `make train ARGS="fusion=alternating trainer.max_epochs=5"`.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
UV      ?= $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")
ARGS    ?=
CKPT    ?=
PYTEST_ARGS ?=

.PHONY: help install train eval demo sweep test test-full lint format bench soak clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(UV):
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --user --quiet uv

# uv (not pip) resolves torch + torchvision as a matching pair from the registry. Bytecode is
# compiled once here (about 25 s): where PYTHONDONTWRITEBYTECODE is set, every process would
# otherwise recompile the libraries it imports, about 10 s per `python train.py`.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-extras --python 3.11 --compile-bytecode
	@touch $(STAMP)

install: $(STAMP) ## Create .venv from uv.lock (idempotent)

# The quick-start reads its frozen ResNet's maps from the feature cache: train.py's first run
# writes it (about 20 s), later runs find it complete and go straight to training.
train: $(STAMP) ## Train the quick-start experiment on the embedded synthetic data (ARGS=overrides)
	$(PYTHON) train.py experiment=quickstart $(ARGS)

eval: $(STAMP) ## Evaluate a checkpoint: make eval CKPT=path/to.ckpt [ARGS=...]
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=path/to/checkpoint.ckpt [ARGS='data=vqav2 data.root=...']"; exit 2; }
	$(PYTHON) -m vqa.cli.eval ckpt_path=$(CKPT) $(ARGS)

# Serves on 127.0.0.1 (a free port unless ARGS="port=7860"); Ctrl+C stops it.
demo: $(STAMP) ## Interactive demo page for a checkpoint: make demo CKPT=path/to.ckpt [ARGS=...]
	@test -n "$(CKPT)" || { echo "usage: make demo CKPT=path/to/checkpoint.ckpt [ARGS='port=7860 device=cuda']"; exit 2; }
	$(PYTHON) -m vqa.cli.demo ckpt_path=$(CKPT) $(ARGS)

sweep: $(STAMP) ## Small fusion comparison on the synthetic set (Hydra multirun)
	$(PYTHON) train.py -m hparams_search=fusions $(ARGS)
	$(PYTHON) scripts/summarize_sweep.py logs/sweep_fusions/multiruns

test: $(STAMP) ## Fast test suite (what CI runs)
	$(PYTHON) -m pytest -n auto $(PYTEST_ARGS)

# The demo page's browser test drives Debian's Chromium (Playwright's own browser download is not
# needed); without one it is skipped, so a failed install only warns.
test-full: $(STAMP) ## Full test suite, slow tests included
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y chromium; } || \
		echo "warning: Chromium is missing and could not be installed (apt-get install -y chromium, as root); the demo page's browser test will be skipped"
	$(PYTHON) -m pytest -n auto -m "" $(PYTEST_ARGS)

lint: $(STAMP) ## Ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## Ruff autofix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## Benchmarks (JSON + markdown table under logs/bench)
	$(PYTHON) scripts/benchmark.py $(ARGS)

# ARGS here are the script's options, then Hydra overrides: ARGS="--minutes 20 fusion=parallel".
soak: $(STAMP) ## Memory/step-time soak of the quick-start (ARGS="--minutes 20"; logs/soak)
	$(PYTHON) scripts/soak.py $(ARGS)

clean: ## Remove caches and outputs (keeps .venv and data/)
	rm -rf logs .pytest_cache .ruff_cache outputs multirun
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
