#!/usr/bin/env bash
# Install everything the test suite needs into the current Python environment:
# the CPU build of torch 2.13.0, torch_ucp with its `test` extra, DeepSpeed 0.19.8 (CPU,
# no compiled ops) for the DeepSpeed universal-checkpoint import tests, and TorchTitan 0.3.0.
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
# TorchTitan 0.3.0 (Python >= 3.11) for the TorchTitan adapter test, without its declared
# dependencies (datasets, torchdata, wandb, tensorboard, ... serve its trainer, not the
# checkpoint manager and llama3 model the test uses): only tyro (its config system) and
# spmd_types (imported by its parallelism code). Nothing here pulls another torch.
if python -c "import sys; sys.exit(sys.version_info < (3, 11))" && ! python -c "import torchtitan" >/dev/null 2>&1; then
  python -m pip install --quiet --disable-pip-version-check "tyro>=0.9" "spmd_types==0.2.3"
  python -m pip install --quiet --disable-pip-version-check --no-deps "torchtitan==0.3.0"
fi
python -c "import torch, torch_ucp; print(f'torch {torch.__version__}, torch_ucp {torch_ucp.__version__}')"
