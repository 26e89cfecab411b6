# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/python -m tresfinetune demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check tresfinetune tests benchmarks
	# Passive OpenMP threads: test subprocesses share 2 cores without spinning against each other.
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tresfinetune tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
