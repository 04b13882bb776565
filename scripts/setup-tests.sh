#!/usr/bin/env bash
# Install everything the test suite needs into the current Python environment:
# the CPU build of torch 2.13.0, torch_ucp with its `test` extra, and DeepSpeed 0.19.8 (CPU,
# no compiled ops) for the DeepSpeed universal-checkpoint import tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
if ! python -c "import deepspeed" >/dev/null 2>&1; then
  python -m pip install --quiet --disable-pip-version-check \
    einops hjson msgpack ninja packaging psutil py-cpuinfo pydantic tqdm
  DS_ACCELERATOR=cpu DS_BUILD_OPS=0 python -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation --no-deps "deepspeed==0.19.8"
fi
python -c "import torch, torch_ucp; print(f'torch {torch.__version__}, torch_ucp {torch_ucp.__version__}')"
