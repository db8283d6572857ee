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

# 1,048,576 images end to end against 131,072 (about 45 minutes on 2 cores the first time, 10 of them
# synthesising the images), then the near-duplicate search in one process at 1M, 2M and 4M pHashes (about 20 minutes)
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_near.py --in-process --variants 1 2 4

# near-duplicate search on 2 workers at 1M, 4M and 16.8M plankton-like pHashes (16.8M did not finish in 40
# minutes on 2 cores: see benchmarks/README.md)
bench-near: $(STAMP)
	$(BIN)/python benchmarks/bench_near.py

clean:
	rm -rf demo-output benchmarks/data .pytest_cache
