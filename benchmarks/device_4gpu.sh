#!/usr/bin/env bash
# One 4-GPU device call: the full-depth 8B Memory+ and dense configs, 50 steps each, through the
# project's deepspeed launcher (torchrun if deepspeed cannot start). Layout by GPU memory, as the
# memory calculator chose: >= 120 GiB cards: TP=2 x PP=2; 80 GiB cards: TP=4 (+SP).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
if [ "$mib" -ge 122880 ]; then LAYOUT="--tp 2 --pp 2 --sequence-parallel"; GIB=141; else LAYOUT="--tp 4 --sequence-parallel"; GIB=80; fi
LAUNCHER=deepspeed
python3 -c "import deepspeed.launcher.runner" 2>/dev/null || { echo "deepspeed unavailable: torchrun"; LAUNCHER=torchrun; }
python3 -m megatron_memory.tools.memory_calculator --world-size 4 --gpu-gib $GIB -- --preset 8b-memory --global-batch-size 8 $LAYOUT
COMMON="--steps 50 --warmup-steps 5 --log-interval 10 --global-batch-size 8 --micro-batch-size 1 --vocab-size 32000 --tensorboard-dir '' --eval-iters 0"
timeout 520 python3 benchmarks/bench_training.py --gpus 4 --launcher $LAUNCHER --title "Full-depth 8B Memory+ vs dense, 4 GPUs" \
  --run "8b-memory:--preset 8b-memory $LAYOUT" --run "8b-dense:--preset 8b-dense $LAYOUT" --common "$COMMON" 2>&1 | tail -12
grep -h "step .*/50\|peak mem\|key usage" $OUT/train_*.log | tail -14
