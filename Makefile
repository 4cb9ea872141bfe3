# One command per job; each creates .venv when missing.
#   make demo   install everything and run the end-to-end main job offline
#   make test   install everything and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= out

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and through the constraints file, so no dependency swaps in a CUDA build
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m hf_quantizable.pipeline --local-dir $(DEMO_DIR) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check hf_quantizable tests benchmarks
	$(PY) -m ruff format --check hf_quantizable tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
