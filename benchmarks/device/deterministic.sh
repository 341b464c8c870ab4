#!/usr/bin/env bash
# One 1-GPU device call (issue 30): what --deterministic gives and costs on a GPU.
#   resume  134M preset, 40 steps, micro-batch 4 x 2048, global 8: with --deterministic, two
#           straight runs, and a run killed by SIGKILL after its save at step 20 then resumed to
#           40; without it, two straight runs for contrast. Every loss and grad norm is compared
#           at full precision (bench_resume.py --compare).
#   speed   8B width (d 4096, FFN 14336, GQA 8), 12 layers, memory layers 2 6 10, micro-batch
#           4 x 2048, global 32, on ONE GPU: --deterministic against the default, tokens/s and
#           peak memory (bench_training.py). One GPU holds the 12 layers only with a smaller
#           table: n_keys 512 (2^18 values, not 2^20; the calculator predicts 71.4 GiB).
# Arguments: the parts to run (default "resume speed"). DET_RESUME_FLAGS / DET_SPEED_FLAGS replace
# the model flags of a part (the CPU check of this script runs the tiny preset through them).
set -u
source benchmarks/device/setup.sh || exit 1
RESUME_FLAGS=${DET_RESUME_FLAGS:---preset 134m-memory --micro-batch-size 4 --global-batch-size 8}
SPEED_FLAGS=${DET_SPEED_FLAGS:---preset 8b-memory --num-layers 12 --memory-layers 2 6 10 --memory-n-keys 512 --micro-batch-size 4 --global-batch-size 32}
OUT=${OUT:-/tmp/deterministic}
mkdir -p "$OUT"

phase() {  # phase NAME PHASE [TRAIN FLAGS...]: one bench_resume.py run, its JSON in $OUT/NAME.json
  local name=$1 ph=$2
  shift 2
  echo "== $name ($ph)"
  timeout 240 python3 benchmarks/bench_resume.py --phase "$ph" --ckpt "$OUT/ckpt" --json "$OUT/$name.json" \
    -- $RESUME_FLAGS --steps 40 --warmup-steps 4 --log-interval 10 --eval-iters 0 --tensorboard-dir "" "$@" \
    2>&1 | grep -v -i "warn" | grep -E "^step|loaded|saved|stopping|rror" | tail -6
}

resume_part() {
  rm -rf "$OUT/ckpt"
  phase det_a straight --deterministic
  phase det_b straight --deterministic
  phase det_killed killed --deterministic
  phase det_resumed resume --deterministic
  phase default_a straight
  phase default_b straight
  rm -rf "$OUT/ckpt"
  for runs in "det_a det_b" "det_a det_killed det_resumed" "default_a default_b"; do
    local files=()
    for run in $runs; do files+=("$OUT/$run.json"); done
    echo "-- ${runs/ / vs }"
    python3 benchmarks/bench_resume.py --compare "${files[@]}" 2>&1 | tail -3
  done
}

speed_part() {
  timeout 420 python3 benchmarks/bench_training.py --gpus 1 --run-timeout 200 \
    --title "--deterministic vs default, 8B width, 12 layers, n_keys 512, micro-batch 4 x 2048, one GPU" \
    --run "default:$SPEED_FLAGS" --run "deterministic:$SPEED_FLAGS --deterministic" \
    --common "--steps 10 --warmup-steps 2 --log-interval 5 --vocab-size 32000 --tensorboard-dir '' --eval-iters 0" \
    2>&1 | tail -6
  awk -F'|' '$2 ~ /^ (default|deterministic) $/ { gsub(/[ ,]/, "", $4); tok[$2] = $4 }
    END { d = tok[" default "]; x = tok[" deterministic "]
          if (d > 0 && x > 0) printf "deterministic / default tokens/s: %.1f%%\n", 100 * x / d }' \
    "$OUT/bench_training.md"
}

for part in ${@:-resume speed}; do
  case $part in
    resume) resume_part ;;
    speed) speed_part ;;
    *) echo "unknown part $part: choose resume or speed"; exit 2 ;;
  esac
done
