#!/usr/bin/env bash
# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
# Several device scripts at once on one multi-GPU machine, each on its own GPUs, in ONE device
# call (device time is per machine: a 4-GPU machine running a 2-GPU benchmark and a 2-GPU long run
# side by side costs half of running them one after the other):
#   bash benchmarks/device/jobs.sh LIMIT_S "GPUS NAME COMMAND..." ["GPUS NAME COMMAND..." ...]
#   e.g. bash benchmarks/device/jobs.sh 540 "0,1 speed bash benchmarks/device/speed_2gpu.sh 4 1" \
#            "2,3 longrun LONGRUN_GPUS=2 bash benchmarks/device/longrun.sh 1"
# Each job sees only its GPUs (CUDA_VISIBLE_DEVICES), writes to its own OUT=/tmp/jobs/NAME and its
# console to /tmp/jobs/NAME/console.log, and is killed with its process group after LIMIT_S.
# Single-node launches use torchrun --standalone (a free port each), so jobs do not collide.
# Everything comes back as $OUT/jobs.tgz (a call returns at most 8 files); each console's tail is
# printed. Timings measured this way share the host's CPUs and PCIe: compare within a job only,
# and run launch-bound ones (micro-batch 1 training steps) alone: in run 18 the same dense
# micro-batch-1 run gave 11,984 and 33,647 tok/s beside a long run on the other GPUs.
set -u
LIMIT=${1:?usage: jobs.sh LIMIT_S "GPUS NAME COMMAND" ...}; shift
source benchmarks/device/setup.sh || exit 1
ROOT=/tmp/jobs; rm -rf "$ROOT"; mkdir -p "$ROOT"
for spec in "$@"; do
  read -r gpus name cmd <<< "$spec"
  mkdir -p "$ROOT/$name"
  # setsid: the job's own process group, so the limit kills torchrun's ranks with it
  CUDA_VISIBLE_DEVICES=$gpus OUT=$ROOT/$name setsid bash -c "$cmd" > "$ROOT/$name/console.log" 2>&1 &
  echo "$!" > "$ROOT/$name/pid"; echo "job $name on GPUs $gpus: $cmd"
done
deadline=$(( $(date +%s) + LIMIT ))
for spec in "$@"; do
  read -r gpus name cmd <<< "$spec"
  pid=$(cat "$ROOT/$name/pid")
  while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 2; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 -- "-$pid"; echo "job $name: killed at the ${LIMIT} s limit" >> "$ROOT/$name/console.log"; fi
  wait "$pid"; echo "rc=$?" >> "$ROOT/$name/console.log"
done
for spec in "$@"; do
  read -r gpus name cmd <<< "$spec"
  echo "===== $name (GPUs $gpus)"; tail -n "${TAIL_LINES:-40}" "$ROOT/$name/console.log" | cut -c1-240
done
mkdir -p "${OUT:=/tmp/out}"; tar czf "$OUT/jobs.tgz" -C "$ROOT" . && ls -l "$OUT/jobs.tgz"
