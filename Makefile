# Two commands do all set-up on a fresh clone:  `make demo`  and  `make test`.
# They create .venv, install torch (TORCH, pinned to the CPU wheel these machines keep on disk; override it
# elsewhere, e.g. `make test TORCH=torch`) and this package with its dev extra, then run.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/segformer demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check segformer tests bench && $(BIN)/ruff format --check segformer tests bench

bench: $(STAMP)
	$(BIN)/python bench/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info
