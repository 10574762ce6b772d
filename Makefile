# The two commands: `make train` (demo pre-training on local Ray) and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A plain `torch` from PyPI is a multi-GB CUDA build: machines without an NVIDIA driver take the CPU build instead
# (found in pip's --find-links here; elsewhere point pip at a CPU wheel index). Override with `make TORCH=...`.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=
TRAIN_ARGS ?=

.PHONY: train test bench bench-data soak readme-plot clean

# torch with pip, which reads pip's settings (where the local CPU build is); the rest with uv, which downloads,
# installs and byte-compiles in parallel (the whole venv in ~1.7 minutes here instead of pip's ~3.7), held to that
# torch so that no dependency swaps it for a multi-GB download.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" uv
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch.txt
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -c $(VENV)/torch.txt -e ".[test]"
	touch $@

train: $(VENV)/.installed
	$(BIN)/python -m raypt.demo --out out/demo
	$(BIN)/python -m raypt.train --config configs/demo.yaml $(TRAIN_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/cpu_share.py
	$(BIN)/python bench/checkpoint.py
	$(BIN)/python bench/feed.py
	$(BIN)/python bench/actor_start.py
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/pipeline_start.py

bench-data: $(VENV)/.installed
	$(BIN)/python bench/data.py

soak: $(VENV)/.installed
	$(BIN)/python bench/soak.py

# The README's plot: the demo run's loss curve (`python -m raypt.report`), regenerated from a fresh demo run.
readme-plot: $(VENV)/.installed
	$(BIN)/python -m raypt.demo --out out/demo
	rm -rf out/runs/readme-plot
	$(BIN)/python -m raypt.train --config configs/demo.yaml --set run.storage_path=out/runs --set run.name=readme-plot
	mkdir -p bench/plots
	cp out/runs/readme-plot/report/loss.png bench/plots/demo-loss.png

clean:
	rm -rf $(VENV) runs out .pytest_cache
