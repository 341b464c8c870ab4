#!/usr/bin/env bash
# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
# One 1-GPU device call (issues 10 and 14): where Memory+ spends its time.
#   bash benchmarks/device/profile_1gpu.sh     # carry .whl and build/longrun-data
# 1. the layer vs the dense FFN at d = 768 (the 134M preset), 2048, 4096 with a kernel breakdown;
# 2. a profiled training step of 134m-memory and 134m-dense at the long run's batch
#    (micro-batch 16 x 2048, global 64, build/longrun-data): the breakdown behind run 11's
#    162k vs 344k tok/s.
set -u
source benchmarks/device/setup.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 260 python3 benchmarks/bench_memory_layer.py --profile --top 24 --rep-ms 100 \
    --widths 768 2048 4096 > "$OUT/layer.txt" 2>&1
echo "layer bench rc=$?"; grep -v "^  " "$OUT/layer.txt" | tail -110
DATA=${LONGRUN_DATA:-build/longrun-data}  # the long run's data (either corpus)
python3 benchmarks/bench_training.py --gpus 1 --run-timeout 150 \
    --title "134M, micro-batch 16 x 2048, global 64, step 6 profiled" \
    --run "134m-memory:--preset 134m-memory" --run "134m-dense:--preset 134m-dense" \
    --common "--steps 8 --profile-step 6 --micro-batch-size 16 --global-batch-size 64 \
--warmup-steps 2 --log-interval 1 --tensorboard-dir= --eval-iters 0 \
--data-path $DATA/train_document --tokenizer $DATA/tokenizer.json" 2>&1 | tail -8
for m in memory dense; do grep -h -A40 "profile of step" "$OUT/train_134m-$m.log" | head -42; done
