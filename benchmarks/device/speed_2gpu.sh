#!/usr/bin/env bash
# One 2-GPU device call (issue 10): 8B width, 12 layers, TP=2 + SP; dense vs Memory+ at
# micro-batch 4 x 2048 (global 32) and 1 x 2048 (global 8); every run profiles step 9 (its
# kernel table and the step breakdown: GPU busy vs idle, kernel time by kind). Each micro-batch
# size is its own bench_training call with a time limit, so a slow one loses only itself.
# Arguments: the micro-batch sizes to run (default "4 1"; "4g128": 4 x 2048 at global batch 128,
# where the table's per-step optimizer update is spread over 32 micro-batches, not 8).
# SPEED_VARIANTS (default "memory perlookup dense"): which runs, in order, of
#   memory    Memory+ as trained by default (on CUDA: the deferred table gradient, run 21, and
#             each memory layer replayed from CUDA graphs, run 25)
#   eager     Memory+ with --no-cuda-graph-memory (the memory layers run op by op)
#   nokeys    Memory+ with --no-key-usage (what the key-usage instruments cost)
#   graphs    Memory+ with --cuda-graph-memory (the default since run 25; kept for older commands)
#   perlookup Memory+ with --no-defer-table-grad (one main_grad pass per lookup)
#   deferred  Memory+ with --defer-table-grad (the default; kept for older commands)
#   dense     the dense model of the same body
# SPEED_STEPS (default 10): training steps per run (2 warm-up; step 9 is profiled, not timed).
set -u
source benchmarks/device/setup.sh || exit 1
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q tests/kernels/test_bf16_search.py -k gpu 2>&1 | tail -3
COMMON="--steps ${SPEED_STEPS:-10} --warmup-steps 2 --log-interval 5 --vocab-size 32000 --tensorboard-dir '' --eval-iters 0"
BODY="--num-layers 12 --tp 2 --sequence-parallel"
MEMORY="--preset 8b-memory --memory-layers 2 6 10 $BODY"
for size in ${@:-4 1}; do
  case $size in 4) set -- 4 32 ;; 1) set -- 1 8 ;; 4g128) set -- 4 128 ;;
    *) echo "micro-batch $size: choose 4, 1 or 4g128 (4 x 2048, global 128)"; exit 2 ;; esac
  BATCH="--micro-batch-size $1 --global-batch-size $2 --profile-step 9"
  RUNS=()
  for v in ${SPEED_VARIANTS:-memory perlookup dense}; do
    case $v in
      memory) RUNS+=(--run "mb$size-memory:$MEMORY $BATCH") ;;
      eager) RUNS+=(--run "mb$size-memory-eager:$MEMORY $BATCH --no-cuda-graph-memory") ;;
      nokeys) RUNS+=(--run "mb$size-memory-nokeys:$MEMORY $BATCH --no-key-usage") ;;
      graphs) RUNS+=(--run "mb$size-memory-graphs:$MEMORY $BATCH --cuda-graph-memory") ;;
      deferred) RUNS+=(--run "mb$size-memory-deferred:$MEMORY $BATCH --defer-table-grad") ;;
      perlookup) RUNS+=(--run "mb$size-memory-perlookup:$MEMORY $BATCH --no-defer-table-grad") ;;
      dense) RUNS+=(--run "mb$size-dense:--preset 8b-dense $BODY $BATCH") ;;
      *) echo "SPEED_VARIANTS: unknown run $v (memory, eager, nokeys, graphs, perlookup, deferred, dense)"; exit 2 ;;
    esac
  done
  timeout 400 python3 benchmarks/bench_training.py --gpus 2 \
    --title "8B width (GQA 8), 12 layers, TP=2+SP, micro-batch $1 x 2048, global $2" \
    "${RUNS[@]}" --common "$COMMON" 2>&1 | tail -8
  [ -n "${OUT:-}" ] && [ -f "$OUT/bench_training.md" ] && mv "$OUT/bench_training.md" "$OUT/bench_training_$size.md"
done
