#!/usr/bin/env bash
# One 2-GPU device call (issue 10): 8B width, 12 layers, TP=2 + SP; dense vs Memory+ at
# micro-batch 4 x 2048 (global 32) and 1 x 2048 (global 8); Memory+ also with the deferred table
# gradient (--defer-table-grad); the memory runs profile step 9. Each micro-batch size is its own
# bench_training call with a time limit, so a slow one loses only itself. Arguments: the
# micro-batch sizes to run (default "4 1"; one per device call keeps a call under 600 s).
set -u
source benchmarks/device_speed_setup.sh || exit 1
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q tests/kernels/test_bf16_search.py -k gpu 2>&1 | tail -3
COMMON="--steps 10 --warmup-steps 2 --log-interval 5 --vocab-size 32000 --tensorboard-dir '' --eval-iters 0"
BODY="--num-layers 12 --tp 2 --sequence-parallel"
for size in ${@:-4 1}; do
  case $size in 4) set -- 4 32 ;; 1) set -- 1 8 ;; *) echo "micro-batch $size: choose 4 or 1"; exit 2 ;; esac
  timeout 400 python3 benchmarks/bench_training.py --gpus 2 \
    --title "8B width (GQA 8), 12 layers, TP=2+SP, micro-batch $1 x 2048, global $2" \
    --run "mb$1-memory:--preset 8b-memory --memory-layers 2 6 10 $BODY --micro-batch-size $1 --global-batch-size $2 --profile-step 9" \
    --run "mb$1-memory-deferred:--preset 8b-memory --memory-layers 2 6 10 $BODY --micro-batch-size $1 --global-batch-size $2 --defer-table-grad --profile-step 9" \
    --run "mb$1-dense:--preset 8b-dense $BODY --micro-batch-size $1 --global-batch-size $2 --profile-step 9" \
    --common "$COMMON" 2>&1 | tail -8
  [ -n "${OUT:-}" ] && [ -f "$OUT/bench_training.md" ] && mv "$OUT/bench_training.md" "$OUT/bench_training_mb$1.md"
done
