#!/usr/bin/env bash
# One 1-GPU device call (issue 14): query normalisation at the 8B preset's width (4 layers,
# memory in layers 1 and 3, 2^19 values, 4 heads x top-32, k_dim 512), micro-batch 4 x 2048 of
# natural text, 100 steps, each of none / batchnorm / center with a 2- and a 25-step warm-up:
# six fresh runs in their own processes, one table (bench_key_usage.py) and JSON lines in $OUT.
# Needs build/longrun-data (bash benchmarks/device/longrun_data.sh) and .whl carried. About 5 minutes.
set -u
source benchmarks/device/setup.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 560 python3 benchmarks/bench_key_usage.py --width 4096 --seq-length 2048 --steps 100 \
    --log-interval 5 --warmup 2 25 --norms none batchnorm center \
    --data-prefix build/longrun-data/train_document --tokenizer build/longrun-data/tokenizer.json \
    --out "$OUT/key_usage_4096.jsonl" 2>&1 | tail -12
