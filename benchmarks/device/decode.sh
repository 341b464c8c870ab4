#!/usr/bin/env bash
# One 1-GPU device call (issue 14): decode latency per token, dense vs Memory+ vs MoE
# (benchmarks/bench_decode.py), each base in its own process, then one PNG of the fused runs.
#   bash benchmarks/device/decode.sh [bench_decode.py arguments, e.g. --batches 1 8 64]
# Environment (defaults): DECODE_BASES ("1.3b 8b") run on the fused Memory+ path with a kernel
# profile; DECODE_UNFUSED ("1.3b") also on the pre-fusion path, graph mode only, for a
# before/after in the same call; DECODE_CHECKS (1) first runs the GPU tests of the fused kernels
# and benchmarks/bench_search.py. Every step gets what is left of DECODE_BUDGET (570) seconds.
set -u
source benchmarks/device/setup.sh || exit 1
out=${OUT:-build/decode}; mkdir -p "$out"
end=$((SECONDS + ${DECODE_BUDGET:-570}))
step() {  # step LIMIT NAME CMD...: run CMD with min(LIMIT, time left), report its status
  local limit=$1 name=$2; shift 2
  local left=$((end - SECONDS)); [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, ${left}s left"; return; fi
  timeout "$limit" "$@"; echo "$name: exit status $? (limit ${limit}s)"
}
if [ "${DECODE_CHECKS:-1}" = 1 ]; then
  step 150 "GPU tests" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_bf16_search.py \
    tests/kernels/test_query_prologue.py tests/export/test_standalone_gpu.py 2>&1 | tail -15
  step 90 bench_search python3 benchmarks/bench_search.py 2>&1 | grep -v "^$"
fi
for base in ${DECODE_BASES:-1.3b 8b}; do
  step 200 "decode $base fused" python3 benchmarks/bench_decode.py --bases "$base" --profile \
    --csv "$out/decode_$base.csv" "$@"
  for u in ${DECODE_UNFUSED-1.3b}; do
    [ "$u" = "$base" ] || continue
    OUT=$out/unfused step 120 "decode $base unfused" python3 benchmarks/bench_decode.py --bases "$base" \
      --memory-path unfused --modes graph --csv "$out/unfused/decode_$base.csv" "$@"
  done
done
csvs=$(ls "$out"/decode_1.3b.csv "$out"/decode_8b.csv 2>/dev/null)
[ -n "$csvs" ] && python3 benchmarks/bench_decode.py --plot $csvs --png "$out/decode.png"
if [ -n "${OUT:-}" ]; then  # at most 8 files come back from a call: one tarball of them all
  tar czf /tmp/decode.tgz -C "$out" . && find "$out" -mindepth 1 -delete && mv /tmp/decode.tgz "$out/"
fi
