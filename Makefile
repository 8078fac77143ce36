# Two commands do all set-up: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CONSTRAINTS := constraints.txt

.PHONY: quickstart test gpu-check install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -c $(CONSTRAINTS) -e .

install-dev: $(PY)
	$(PIP) install -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -c $(CONSTRAINTS) -e '.[dev]'

quickstart: install
	$(VENV)/bin/climber quickstart

test: install-dev
	$(PY) -m pytest

# on a machine with a CUDA GPU: structured attention on the GPU against the CPU oracle, flex against tiled,
# a two-epoch bf16 training, eval and bench on the GPU (skipped, with the reason, without one)
gpu-check: install-dev
	$(PY) -m pytest -m gpu -rs -s tests/test_gpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
