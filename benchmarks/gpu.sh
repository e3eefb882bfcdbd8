#!/usr/bin/env bash
# The GPU checks and measurements of the speed issue in one prepared run on one H100/H200
# (its steps' timeouts add up to 8 min 40 s),
# with a CUDA build of torch and arvae's dependencies importable (arvae itself is put on
# PYTHONPATH here, so it needs no install):
#   OUT=/tmp/gpu bash benchmarks/gpu.sh
# On a machine that has torch and Lightning but cannot fetch packages, the wheels of the rest
# (pure Python, downloaded elsewhere into .whl/, see benchmarks/README.md) are installed from
# .whl/ into a temporary folder first.
# 1. The 13-layer x 32-channel gated PixelCNN (batch 64): training images/s and MFU in fp32
#    and bf16-mixed, eager, compiled and compiled with CUDA graphs (reduce-overhead), plus
#    cached and uncached sampling (on the GPU, from the same noise: 'same draws'); the
#    compiled CUDA-graph step also through Trainer.fit (Lightning's loop, the stability
#    guard, which needs no host sync), beside the bare step.
# 2. The Table 1 Gated PixelVAE: the same, and IWAE test images/s at k = 5000.
# Six logs go to $OUT (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/arvae_gpu}
mkdir -p "$OUT"
export WANDB_MODE=offline
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit
    export PYTHONPATH="$PYTHONPATH:$site"
fi
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
    >"$OUT/machine.txt" 2>&1
# 0. Correctness first: the stability guard's tests on the GPU (fused CUDA Adam told
#    found_inf, the guard's device counters read through CUDA events, fp16 AMP with CUDA's
#    GradScaler, compiled training with CUDA graphs and its exact resume); not the DDP one.
timeout 60 python3 -m pytest -q -n 0 -p no:cacheprovider -rs tests/test_stability.py \
    -k "not ddp" >"$OUT/gpu_tests.txt" 2>&1
for mode in eager default reduce-overhead; do
    extra=()
    case $mode in
        eager) extra=(--uncached); limit=80 ;;
        default) extra=(--compile default); limit=110 ;;
        reduce-overhead) extra=(--compile reduce-overhead --fit-steps 100); limit=120 ;;
    esac
    timeout $limit python3 benchmarks/table.py gated_pixelcnn --batch 64 --train-seconds 20 \
        --iwae-k 0 "${extra[@]}" >"$OUT/gated_pixelcnn_$mode.txt" 2>&1
done
timeout 150 python3 benchmarks/table.py gated_pixelvae --train-seconds 20 --compile reduce-overhead \
    --fit-steps 100 --iwae-k 5000 --iwae-images 16 >"$OUT/gated_pixelvae.txt" 2>&1
tail -n 20 "$OUT"/*.txt
