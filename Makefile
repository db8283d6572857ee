# Two commands set up and use a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-full bench-gpu bench-embed bench-scale bench-near clean

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

# 1,048,576 images end to end against 131,072 (about an hour on 2 cores the first time: synthesising the images)
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_near.py
	$(BIN)/python benchmarks/bench_scale.py

# near-duplicate candidate search at 1M, 4M and 17.4M plankton-like pHashes (about 30 minutes on 2 cores)
bench-near: $(STAMP)
	$(BIN)/python benchmarks/bench_near.py

clean:
	rm -rf demo-output benchmarks/data .pytest_cache
