# `make run` and `make test` set everything up on first use (a virtualenv in .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On the project's CPU machines this pin takes the CPU wheel that lies on disk; elsewhere choose your build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test test-fast lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/esft run --config configs/experiments/builtin.py:intent

# One test worker per core (pytest-xdist); a file's tests stay on one worker, sharing its fixtures.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile --durations=10

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
