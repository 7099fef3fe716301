# Two commands do all set-up on a fresh clone:  `make demo`  and  `make test`.
# They create .venv, install torch (TORCH, pinned to the CPU wheel these machines keep on disk; override it
# elsewhere, e.g. `make test TORCH=torch`) and this package with its dev extra, then run.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-portable install browser lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/segformer demo

# The browser tests (web page, evaluation report) drive Debian's Chromium through Playwright with the system
# binary (Playwright's own browser download needs the network). Installing it needs root (apt-get).
browser:
	@command -v chromium >/dev/null || { apt-get install -y -q chromium >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }
	@command -v chromium >/dev/null || { echo "make: Chromium is needed for the browser tests: apt-get install chromium (as root)"; exit 1; }

# --durations lists the slowest tests at the end: the suite is kept under ~10 minutes on 2 cores.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The edit loop: everything but the tests marked slow (subprocesses, torchrun, b3-b5): 25-75 s on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

# The numerical tests again on the portable kernels, so that a tolerance tuned on one CPU fails here first (the
# tests marked output, which check what a command prints, not numbers, run once, in `make test`).
# torch 2.13's CPU wheel honours all four: ATEN_CPU_CAPABILITY picks ATen's own kernels (default = no
# AVX2/AVX-512 code), MKL_ENABLE_INSTRUCTIONS caps MKL's GEMMs at AVX2, ONEDNN_MAX_CPU_ISA caps oneDNN's
# convolutions at AVX2, FBGEMM_ENABLE_INSTRUCTIONS caps fbgemm's int8 GEMMs (--dtype int8) at AVX2 (which none of
# the others reach: 2.2x slower capped, measured). The last three change the summation order on an AVX-512
# machine; the first alone does not.
PORTABLE := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2
NUMERICAL := tests/test_modeling.py tests/test_oracle.py tests/test_processing.py tests/test_inference.py \
	tests/test_export.py tests/test_train.py tests/test_backends.py tests/test_precision.py tests/test_devices.py
test-portable: $(STAMP)
	$(PORTABLE) $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10 -m "not output" $(NUMERICAL)

lint: $(STAMP)
	$(BIN)/ruff check segformer tests bench && $(BIN)/ruff format --check segformer tests bench

bench: $(STAMP)
	$(BIN)/python bench/bench_inference.py

clean:
	rm -rf $(VENV) build *.egg-info
