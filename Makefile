# make demo: create .venv if missing, install, run the sample recipe end to end.
# make test: create .venv if missing, install with dev extras, run the test suite.
# make bench: run the sample recipes and the baselines side by side, rewrite docs/benchmarks.md.
# make bench-memory, make bench-verify-memory: peak memory of calibration, of a whole verified run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build and installed before the package, so no range can pull a CUDA build
TORCH := torch==2.13.0

.PHONY: demo test bench bench-memory bench-verify-memory bench-widths zoo install install-dev sample clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/deploytool run recipes/digits-cnn.toml --out runs/digits-cnn --force

test: install-dev
	$(BIN)/python -m ruff check deploytool tests benchmarks samples
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.run

# peak memory of calibration with 10x more samples; rewrites docs/calibration-memory.md (several minutes)
bench-memory: install
	$(BIN)/python -m benchmarks.calibration_memory

# peak RSS and stage times of a whole run (verify with memory on) on an EfficientNet-B0-sized CNN built in
# code; rewrites docs/verify-memory.md (several minutes)
bench-verify-memory: install
	$(BIN)/python -m benchmarks.verify_memory

# channel widths measured per layer against rounding to multiples of 8; rewrites docs/widths.md (about 2 minutes)
bench-widths: install
	$(BIN)/python -m benchmarks.widths

# the model zoo: ~19 architectures (transformers model classes built from configs, no download, plus recurrent,
# multi-input/multi-output and dict-output networks) each through `deploytool run` with a plain recipe; rewrites
# docs/zoo.md (about 30 minutes on 2 cores)
zoo: install-dev
	$(BIN)/python -m benchmarks.zoo.run

# retrain the digits sample (needs scikit-learn, in the dev extras) and rewrite its data splits
sample: install-dev
	$(BIN)/python -m samples.digits.train

clean:
	rm -rf runs .pytest_cache
