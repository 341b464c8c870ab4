#!/usr/bin/env bash
# One 2-GPU device call: kernel re-bench (GPU 0), TP=1 vs TP=2 layer, 8B-width training runs.
# Needs the wheels in .whl (megatron-core, deepspeed and its deps); writes tables under $OUT.
set -u
DEVICE_ALL_WHEELS=1 source benchmarks/device/setup.sh || exit 1
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/bench_embedding_bag.py 2>&1 | tail -28
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 benchmarks/bench_memory_layer.py 2>&1 | tail -34
timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_tp_layer.py 2>&1 | tail -9
COMMON="--steps 15 --log-interval 5 --global-batch-size 8 --micro-batch-size 1 --vocab-size 32000 --tensorboard-dir '' --eval-iters 0"
timeout 330 python3 benchmarks/bench_training.py --gpus 2 --title "8B-width Memory+ vs dense, 2 GPUs" \
  --run "tp2-memory:--preset 8b-memory --num-layers 12 --tp 2 --sequence-parallel" \
  --run "tp2-dense:--preset 8b-dense --num-layers 12 --tp 2 --sequence-parallel" \
  --run "pp2-memory:--preset 8b-memory --num-layers 8 --pp 2 --memory-n-keys 724" \
  --run "pp2-dense:--preset 8b-dense --num-layers 8 --pp 2" --common "$COMMON" 2>&1 | tail -16
