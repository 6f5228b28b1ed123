# `make demo` and `make test` each set up .venv on first use: torch 2.13.0 (CPU build) first
# when no torch is importable (a bare `torch` requirement would pull a multi-GB CUDA build),
# then the project with its dev extra.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.sparsify-installed
PYTEST_ARGS ?=

.PHONY: setup test demo clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# One pytest worker per core (pytest-xdist); each keeps to one thread (tests/conftest.py).
test: setup
	$(PY) -m pytest -n auto --dist worksteal $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/sparsify upcycle demo:t5 --experts 8 -o t5-moe --force
	$(VENV)/bin/sparsify verify demo:t5 t5-moe
	$(VENV)/bin/sparsify inspect t5-moe

clean:
	rm -rf t5-moe .pytest_cache
