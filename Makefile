# The two commands: `make train` (demo pre-training on local Ray) and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here, not in the lock: machines without an NVIDIA driver take its CPU build (found in pip's
# --find-links here; elsewhere point pip at a CPU wheel index), GPU machines PyPI's CUDA build. `make TORCH=...`.
TORCH ?= torch==2.13.0
UV ?= uv==0.13.9
# Every other package, at the versions the suite passed with (`make lock` writes it). LOCK= installs the newest
# versions pyproject.toml allows instead (`make test-latest`, in its own venv).
LOCK ?= requirements.lock
# Where uv finds the CPU build of torch when it resolves (make lock): pip's --find-links here; elsewhere e.g.
# FIND_LINKS="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple".
FIND_LINKS ?= $(addprefix --find-links ,$(shell $(BIN)/pip config get global.find-links 2>/dev/null))
PYTEST_ARGS ?=
TRAIN_ARGS ?=

.PHONY: train test test-latest lock bench bench-data soak readme-plot clean

# torch with pip, which reads pip's settings (where the local CPU build is); the rest with uv, which downloads,
# installs and byte-compiles in parallel (the whole venv in ~1.3 minutes here instead of pip's ~3.7), held to that
# torch so that no dependency swaps it for a multi-GB download.
$(VENV)/torch.txt: Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" "$(UV)"
	$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $@

$(VENV)/.installed: $(VENV)/torch.txt pyproject.toml $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -c $(VENV)/torch.txt \
	    $(if $(LOCK),-r $(LOCK)) -e ".[test]"
	touch $@

train: $(VENV)/.installed
	$(BIN)/python -m raypt.demo --out out/demo
	$(BIN)/python -m raypt.train --config configs/demo.yaml $(TRAIN_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite on the newest releases pyproject.toml allows, in a venv made afresh each time: drift found on purpose.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LOCK=

# Resolve the newest allowed versions into the lock (torch held to the installed build, whose dependencies it pins
# too; run it where that is the CPU build, or the lock pulls CUDA libraries onto CPU machines). Then `make test`.
lock: $(VENV)/torch.txt
	$(BIN)/uv pip compile -q --python $(BIN)/python pyproject.toml --extra test --upgrade \
	    -c $(VENV)/torch.txt $(FIND_LINKS) --no-emit-package torch --custom-compile-command "make lock" -o $(LOCK)

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
	rm -rf $(VENV) .venv-latest runs out .pytest_cache
