#!/bin/sh
# Regenerates the image's dependency locks from pyproject.toml (needs uv and PyPI):
#   sh deployments/docker/lock.sh              # keeps the current pins where they still resolve
#   sh deployments/docker/lock.sh --upgrade    # newest versions pyproject.toml allows
# Target: the image's Python 3.11 on linux x86_64 (glibc 2.36 in bookworm).
#
# requirements-cpu.lock: the extras VARIANT=cpu installs, resolved against PyPI. The image takes
#   torch/torchvision from PyTorch's CPU index, whose `2.14.1+cpu` builds satisfy `torch==2.14.1`
#   (PEP 440 ignores the local label), so this lock pins versions, not files: no hashes, and the
#   nvidia-*/triton lines (PyPI torch's CUDA dependencies) are never installed by the CPU image.
# requirements-cuda.lock: everything VARIANT=cuda installs comes from PyPI, so it is hash-locked.
#   torch 2.13/2.14 on PyPI is built for CUDA 13, hence dask-cuda's cu13 bindings.
set -eu
cd "$(dirname "$0")/../.."
compile() {
  uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "sh deployments/docker/lock.sh" "$@"
}
compile --extra ml --extra s3 --extra k8s -o deployments/docker/requirements-cpu.lock "$@"
echo 'dask-cuda[cu13]' | compile - --extra gpu --extra s3 --extra k8s --generate-hashes \
  -o deployments/docker/requirements-cuda.lock "$@"
