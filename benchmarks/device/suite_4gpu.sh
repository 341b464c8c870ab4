#!/usr/bin/env bash
# Issue 12: full-depth 8B Memory+ vs dense on one 4-GPU machine, at a batch people pre-train with
# (micro-batch 4 x 2048, global batch 64), in the layout the memory calculator picks for the card
# (the same layout for both models: the one picked for Memory+). Two phases, on the SAME warm
# machine (the ~160 GB checkpoint stays in /tmp between them):
#   bash benchmarks/device/suite_4gpu.sh train    # dense, then Memory+ with a save after its last step
#   bash benchmarks/device/suite_4gpu.sh resume   # Memory+ resumed from that checkpoint for 3 steps
#   bash benchmarks/device/suite_4gpu.sh profile  # both models (Memory+ also with --no-defer-table-grad),
#                                           # 8 steps, step 6 profiled (no save): the step-time
#                                           # breakdown behind the Memory+/dense ratio
#   bash benchmarks/device/suite_4gpu.sh all      # one call: dense with step 9 profiled, Memory+ with
#       # a save after step 10, then its resume for 3 steps with step 12 profiled. The checkpoint
#       # goes to /dev/shm when it has room (host RAM: the save and load measure this code, not
#       # the machine's virtual disk, whose write speed is printed beside them). Run 18 also ran
#       # Memory+ --defer-table-grad here; with it the save left too little time for the resume.
# Reports land in $OUT (bench_training.md, train_*.log, layout.txt, resume.log, ckpt.txt).
set -u
PHASE=${1:?train, resume, profile or all}
source benchmarks/device/setup.sh || exit 1
export CUDA_DEVICE_MAX_CONNECTIONS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CK=/tmp/ck8b
if [ "$PHASE" = all ]; then
    shm_gib=$(df -B1G --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
    [ "${shm_gib:-0}" -ge 170 ] && CK=/dev/shm/ck8b
    echo "checkpoint dir $CK (/dev/shm: ${shm_gib:-?} GiB free)"
fi
STEPS=10
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
GIB=$(python3 -c "print(round($mib / 1024, 1))")
BATCH="--micro-batch-size 4 --global-batch-size 64"
python3 -m megatron_memory.tools.memory_calculator --world-size 4 --gpu-gib "$GIB" --pick -- \
    --preset 8b-memory $BATCH > "$OUT/layout.txt" || { cat "$OUT/layout.txt"; exit 1; }
LAYOUT=$(sed -n 's/^pick: //p' "$OUT/layout.txt")
echo "card ${GIB} GiB; calculator's layout: $LAYOUT"; cat "$OUT/layout.txt"
COMMON="$BATCH --warmup-steps 2 --log-interval 1 --vocab-size 32000 --tensorboard-dir= --eval-iters 0"
df -h /tmp | tail -1
# Dense and Memory+ (which saves after step $STEPS into $CK); $1: per-run limit, $2: title
# suffix, $3: the dense run's extra flags.
train_and_save() {
    python3 benchmarks/bench_training.py --gpus 4 --run-timeout "$1" \
        --title "Full-depth 8B, micro-batch 4 x 2048, global 64, calculator layout$2" \
        --run "8b-dense:--preset 8b-dense $LAYOUT --steps $STEPS $3" \
        --run "8b-memory:--preset 8b-memory $LAYOUT --steps $((STEPS + 3)) --exit-interval $STEPS --save $CK" \
        --common "$COMMON" 2>&1 | tail -12
    grep -h "^saved\|stopping" "$OUT"/train_8b-memory.log | tail -2
    du -sb "$CK" 2>/dev/null | awk '{printf "checkpoint %.1f GiB\n", $1 / 2^30}' | tee "$OUT/ckpt.txt"
}
# Memory+ resumed from $CK for 3 steps; $1: time limit, then extra training flags.
resume() {
    local limit=$1; shift
    timeout "$limit" python3 -m megatron_memory.launch.run torchrun --nproc-per-node 4 -- \
        --preset 8b-memory $LAYOUT --steps $((STEPS + 3)) --load $CK "$@" $COMMON > "$OUT/resume.log" 2>&1
    echo "resume rc=$?"
    grep -h "loaded\|^step\|peak mem\|tok/s\|MFU\|rror" "$OUT/resume.log" | tail -12
    rm -rf "$CK"
}
if [ "$PHASE" = profile ]; then
    python3 benchmarks/bench_training.py --gpus 4 --run-timeout 200 \
        --title "Full-depth 8B, micro-batch 4 x 2048, global 64, calculator layout, step 6 profiled" \
        --run "8b-dense:--preset 8b-dense $LAYOUT --steps 8 --profile-step 6" \
        --run "8b-memory:--preset 8b-memory $LAYOUT --steps 8 --profile-step 6" \
        --run "8b-memory-perlookup:--preset 8b-memory $LAYOUT --steps 8 --profile-step 6 --no-defer-table-grad" \
        --common "$COMMON" 2>&1 | tail -8
    for m in dense memory memory-perlookup; do grep -h -A28 "profile of step" "$OUT/train_8b-$m.log" | head -30; done
elif [ "$PHASE" = all ]; then
    T0=$(date +%s); rm -rf "$CK"
    train_and_save 240 " (dense step 9 profiled; Memory+ saves, its resume profiles step 12)" "--profile-step 9"
    left=$(( 555 - ($(date +%s) - T0) ))
    echo "resume with ${left} s left"
    if [ -f "$CK/latest_checkpointed_iteration.txt" ] && [ "$left" -gt 90 ]; then
        resume "$left" --profile-step 12
    fi
    rm -rf "$CK"
    dd if=/dev/zero of=/tmp/ddtest bs=1M count=2048 oflag=direct 2>&1 | tail -1; rm -f /tmp/ddtest
    grep -h -A36 "profile of step" "$OUT/train_8b-dense.log" "$OUT/resume.log" 2>/dev/null | cut -c1-62,112-200
elif [ "$PHASE" = train ]; then
    rm -rf "$CK"
    # per-run limits kill a run with all its ranks (the dense run takes ~60 s, Memory+ with its
    # ~130 GiB save ~450 s on the 4 x H200 machine of run 10); the output streams into $OUT
    train_and_save 480 "" ""
    ls "$CK"/iter_*/ 2>/dev/null | wc -l | xargs echo "files:" | tee -a "$OUT/ckpt.txt"
else
    [ -f "$CK/latest_checkpointed_iteration.txt" ] || { echo "no checkpoint in $CK (the machine was not kept warm): run the train phase first"; exit 1; }
    resume 560
fi
