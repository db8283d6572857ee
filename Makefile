# Two commands set up and use a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-full bench-embed clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ml]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pzscale demo demo-output

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py

bench-full: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py --sizes 16384 65536 --repeats 5

bench-embed: $(STAMP)
	$(BIN)/python benchmarks/bench_embed.py --images 384 --repeats 2

clean:
	rm -rf demo-output benchmarks/data .pytest_cache
