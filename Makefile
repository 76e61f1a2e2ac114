# Two entry points: `make demo` (the main job) and `make test` (lint + test suite).
# Each creates .venv and installs the project (editable, with the test extra) when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-peers clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch, pinned (a bare `torch` would pull a multi-GB CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fntk demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/fntk bench

# The peer libraries of benchmarks/fntk_bench/bench_peers.py, then the side-by-side run (DATA: a
# folder laid out like shared/data). --no-deps: their torchvision requirement would replace the
# pinned CPU torch with a CUDA build; nothing of theirs imports torchvision on these code paths.
PEERS := laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 \
	einops==0.8.2 unfoldNd==0.2.3 einconv==0.1.0 opt_einsum==3.4.0 torchmetrics==1.9.0 lightning-utilities==0.15.3
DATA ?= ../shared/data
bench-peers: $(STAMP)
	$(BIN)/pip install -q --no-deps $(PEERS)
	$(BIN)/python -m fntk_bench.bench_peers --data $(DATA)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
