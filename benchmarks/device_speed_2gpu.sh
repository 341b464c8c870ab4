#!/usr/bin/env bash
# One 2-GPU device call (issue 10): 8B width, 12 layers, TP=2 + SP; dense vs Memory+ at
# micro-batch 4 x 2048 (global 32) and 1 x 2048 (global 8); the memory runs profile step 9.
# Each pair is its own bench_training call with a time limit, so a slow pair loses only itself.
set -u
source benchmarks/device_speed_setup.sh || exit 1
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q tests/kernels/test_bf16_search.py -k gpu 2>&1 | tail -3
COMMON="--steps 10 --warmup-steps 2 --log-interval 5 --vocab-size 32000 --tensorboard-dir '' --eval-iters 0"
BODY="--num-layers 12 --tp 2 --sequence-parallel"
for mb in "4 32" "1 8"; do
  set -- $mb
  timeout 280 python3 benchmarks/bench_training.py --gpus 2 \
    --title "8B width (GQA 8), 12 layers, TP=2+SP, micro-batch $1 x 2048, global $2" \
    --run "mb$1-memory:--preset 8b-memory $BODY --micro-batch-size $1 --global-batch-size $2 --profile-step 9" \
    --run "mb$1-dense:--preset 8b-dense $BODY --micro-batch-size $1 --global-batch-size $2 --profile-step 9" \
    --common "$COMMON" 2>&1 | tail -8
  [ -n "${OUT:-}" ] && [ -f "$OUT/bench_training.md" ] && mv "$OUT/bench_training.md" "$OUT/bench_training_mb$1.md"
done
