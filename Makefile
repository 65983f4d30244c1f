# Two entry points: `make demo` and `make test`. Both install into .venv first (pinned versions,
# CPU torch 2.13.0 from constraints.txt, so no CUDA wheels are pulled on CPU machines).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/llmstack quickstart

test: setup
	$(BIN)/pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
