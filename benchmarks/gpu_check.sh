#!/usr/bin/env bash
# The GPU check, on any machine with CUDA, in under 8 minutes on one GPU: the tests marked `gpu` (extraction on
# CUDA, mixed-precision fine-tune / two-stage / scratch, DDP on one device, predict / serve / export of a
# GPU-trained run), then throughput beside the CPU's (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR gets gpu-tests.log and gpu-check.json
#
# Data: ../shared/datasets/{hymenoptera,cifar10} when present, else scikit-learn's digits (no CIFAR-10 rows);
# CLASSFORGE_GPU_DATA / CLASSFORGE_GPU_CIFAR10 point elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu-check}}"
mkdir -p "$out"
py="${PYTHON:-python}"
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
start=$(date +%s)
"$py" -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
echo "gpu tests: $(( $(date +%s) - start )) s"
args=(--out "$out/gpu-check.json")
[ -n "${CLASSFORGE_GPU_DATA:-}" ] && args+=(--data "$CLASSFORGE_GPU_DATA")
[ -n "${CLASSFORGE_GPU_CIFAR10:-}" ] && args+=(--cifar10 "$CLASSFORGE_GPU_CIFAR10")
"$py" benchmarks/gpu_check.py "${args[@]}" 2>&1 | tee "$out/gpu-check.log"
echo "gpu check: $(( $(date +%s) - start )) s in all"
