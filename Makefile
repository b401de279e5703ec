# Two commands on a fresh machine: `make demo` runs the whole loop on an embedded default (synthetic data made on
# the spot, offline, CPU), `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: demo test test-fast install clean

$(BIN)/vlcurate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/vlcurate

install: $(BIN)/vlcurate

demo: install
	$(BIN)/vlcurate demo --output $(OUT)

test: install
	$(BIN)/python -m pytest -q tests

# The edit-test loop: everything but training, the browser, extra clusters and long end-to-end runs.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf out
