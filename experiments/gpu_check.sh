#!/usr/bin/env bash
# GPU check (one H100, a few minutes): bf16 + flash attention stage-1 and stage-2 iterations on a
# mid-size random Wan, FSDP2 on one GPU; writes gpu_check.md (to $OUT when set).
#   bash experiments/gpu_check.sh
# On a machine without diffusers, put its wheels (and importlib_metadata's) in .whl/ first.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 experiments/gpu_check.py --out "${OUT:-.}/gpu_check.md" "$@"
# empty construction and sharded loading on the GPU (nccl): counted bytes per rank, equality with one-process loads
torchrun --nproc_per_node 1 experiments/sharded_loading.py --tiny --device cuda --out "${OUT:-.}/sharded_loading_gpu.md"
