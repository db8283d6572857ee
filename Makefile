# Two commands set up and use a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-full bench-gpu bench-embed clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ml]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pzscale demo demo-output

test: $(STAMP)
	$(BIN)/python -m pytest

# every stage against its ceiling and peer, then the 17.4M projection and the plot
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-full: $(STAMP)
	$(BIN)/python benchmarks/run.py --full

# on a machine with one CUDA GPU (under 5 minutes)
bench-gpu: $(STAMP)
	benchmarks/gpu.sh

bench-embed: $(STAMP)
	$(BIN)/python benchmarks/bench_embed.py --images 384 --repeats 2

clean:
	rm -rf demo-output benchmarks/data .pytest_cache
