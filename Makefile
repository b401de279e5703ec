# Two commands on a fresh machine: `make demo` runs the main job on the bundled default, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/flickr8k
OUT ?= out/demo

.PHONY: demo test install clean

$(BIN)/vlcurate: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/vlcurate

install: $(BIN)/vlcurate

demo: install
	@test -d $(DATA) || { echo "demo data $(DATA) not found: pass DATA=path/to/shards"; exit 2; }
	$(BIN)/vlcurate run configs/qwen-vl-rules.yaml --input $(DATA) --output $(OUT)

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf out
