#!/usr/bin/env bash
# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
# 134M dense vs Memory+ long run (issue 14), one device call per phase on ONE warm machine:
#   bash benchmarks/device/longrun.sh 1     # train both from step 0; checkpoints in /tmp/longrun
#   bash benchmarks/device/longrun.sh 2     # resume both to the end, export, fact recall, summary
# Needs build/longrun-data (bash benchmarks/device/longrun_data.sh) and .whl carried; writes to $OUT.
# LONGRUN_DATA=build/longrun-data-debian: the larger corpus (LONGRUN_DEBIAN=1 longrun_data.sh);
# a .tar.xz of such a folder (what longrun_data.sh also writes) is unpacked into /tmp first.
# The ~11 GB Memory+ checkpoint cannot come back through $OUT nor be carried: phase 2 must run on
# the machine phase 1 left warm (without /tmp/longrun it says so and starts over).
# LONGRUN_GPUS=2: each model data-parallel on 2 GPUs (same batch and schedule): on a 4-GPU machine
# the whole 600-step run and its recall fit one call, beside another job on the other 2 GPUs.
# LONGRUN_TINY=1: tiny models on CPU with this checkout's Python ($PYTHON), a pipeline check.
set -u
export LONGRUN_T0=$(date +%s)   # the time budget counts from here (setup included)
PHASE=${1:?usage: longrun.sh 1|2}
OUT=${OUT:?set OUT to the folder for the results}
if [ "${LONGRUN_TINY:-0}" != 1 ]; then
  source benchmarks/device/setup.sh || exit 1
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
  df -h /tmp | tail -1
fi
export PYTHONUNBUFFERED=1
if [[ "${LONGRUN_DATA:-}" == *.tar.xz ]]; then  # a packed folder (longrun_data.sh): unpack once
  dest=/tmp/longrun-data/$(basename "$LONGRUN_DATA" .tar.xz)
  [ -e "$dest/train_document.bin" ] || { mkdir -p /tmp/longrun-data && tar -C /tmp/longrun-data -xJf "$LONGRUN_DATA"; } || exit 1
  LONGRUN_DATA=$dest
fi
${PYTHON:-python3} benchmarks/device/longrun.py --phase "$PHASE" --out "$OUT" ${LONGRUN_DATA:+--data "$LONGRUN_DATA"}
rc=$?
[ "${LONGRUN_TINY:-0}" != 1 ] && { du -sh /tmp/longrun/ckpt/* 2>/dev/null; df -h /tmp | tail -1; }
exit $rc
