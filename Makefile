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

# Passive OpenMP threads: on a busy machine (or with test subprocesses sharing the cores) spinning threads
# slow PyTorch down several times over.
export OMP_WAIT_POLICY ?= PASSIVE

# Train TResNet-M on the bundled digits (a few minutes on CPU), then predict a few digit images with the new run.
demo: $(VENV)/.installed
	$(BIN)/tresfinetune train recipes/digits.yaml
	$(BIN)/python -m tresfinetune.demo demo_out/digits
	$(BIN)/tresfinetune predict demo_out/digits

test: $(VENV)/.installed-test
	$(BIN)/ruff check tresfinetune tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tresfinetune tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
