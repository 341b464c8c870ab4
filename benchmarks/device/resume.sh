#!/usr/bin/env bash
# One 2-GPU device call: exact resume of the 8B-width model (12 layers, TP=2 + SP): 2N steps
# straight, N steps + save + exit, resume for N; save/load time and checkpoint size.
# Needs the wheels in .whl (megatron-core and its deps); writes the report under $OUT.
set -u
DEVICE_ALL_WHEELS=1 source benchmarks/device/setup.sh || exit 1
export CUBLAS_WORKSPACE_CONFIG=:4096:8
df -h /tmp | tail -1
# n_keys 724 (2^19 values): the full 2^20 table's checkpoint (~94 GB with fp32 Adam state)
# would nearly fill the machine's disk; the model is otherwise the 8B preset at 12 layers.
FLAGS=(--preset 8b-memory --num-layers 12 --tp 2 --sequence-parallel --memory-n-keys 724
       --steps 6 --warmup-steps 2 --log-interval 1 --global-batch-size 8 --micro-batch-size 1
       --vocab-size 32000 --tensorboard-dir "" --eval-iters 0)
CK=/tmp/resume-ckpt
rm -rf "$CK"
for phase in straight first resume; do
    echo "== $phase"
    timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/bench_resume.py --phase $phase --ckpt $CK --json "$OUT/$phase.json" -- "${FLAGS[@]}" \
        2>&1 | grep -v -i "warn" | grep -E "^step|loaded|saved|stopping|rror" | tail -12
    [ "$phase" = first ] && du -sh "$CK" && GIB=$(du -sb "$CK" | awk '{printf "%.2f", $1 / 2^30}')
done
python3 benchmarks/bench_resume.py --report "$OUT/straight.json" "$OUT/first.json" "$OUT/resume.json" \
    --ckpt-gib "${GIB:-0}" --title "Exact resume, 8B width (12 layers, n_keys 724), TP=2 + SP, 2 GPUs" \
    | tee "$OUT/resume.md"
rm -rf "$CK"
