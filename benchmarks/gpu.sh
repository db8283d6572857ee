#!/usr/bin/env bash
# The GPU benchmark: one short script for a machine with one CUDA GPU (under 5 minutes).
# ViT-B/16 embed from the catalog vs the bare model loop in fp32/bf16/fp16, and k-means for
# semantic dedup vs scikit-learn. Results land in benchmarks/results/*--cuda.json with the
# device named; copy them back and commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0))"
timeout 200 $PY benchmarks/bench_embed.py --device cuda --workers 1 --images 2048 --shard-len 256 \
    --batch-size 256 --repeats 2 --models open_clip-ViT-B-16-224 --precision fp32 bf16 fp16
timeout 60 $PY benchmarks/bench_kmeans.py --device cuda --n 1000000 --k 1000 --no-peer
timeout 30 $PY -m pytest tests/test_ml_stages.py -q -k "gpu" -p no:cacheprovider || true
