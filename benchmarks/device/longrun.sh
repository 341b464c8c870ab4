#!/usr/bin/env bash
# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
# 134M long runs (issues 14, 29), one device call per phase on ONE warm machine:
#   bash benchmarks/device/longrun.sh 1 [MODELS]   # train MODELS from step 0; checkpoints in /tmp/longrun
#   bash benchmarks/device/longrun.sh 2 [MODELS]   # resume them to the end, export, fact recall, summary
# MODELS (or LONGRUN_MODELS; default memory,dense): comma-separated specs of benchmarks/device/longrun.py,
# trained in order, each to the end of its schedule or the call's deadline; a finished model is
# exported and scored in the call that finishes it. memory-k256 = Memory+ with --memory-n-keys
# 256 (2^16 values); dense-s1030 = dense on a 1030-step schedule (dense at Memory+'s GPU time).
# Needs build/longrun-data (bash benchmarks/device/longrun_data.sh) and .whl carried; writes to $OUT:
# longrun_phaseN.md (the summary) and longrun_phaseN.tgz (summary, events, logs, recall, PNGs:
# one file, as the device returns at most 8).
# LONGRUN_DATA=build/longrun-data-debian: the larger corpus (LONGRUN_DEBIAN=1 longrun_data.sh);
# a .tar.xz of such a folder (what longrun_data.sh also writes) is unpacked into /tmp first.
# The ~11 GB Memory+ checkpoint cannot come back through $OUT nor be carried: phase 2 must run on
# the machine phase 1 left warm (without /tmp/longrun it says so and starts over).
# LONGRUN_GPUS=2: each model data-parallel on 2 GPUs (same batch and schedule).
# LONGRUN_TINY=1: tiny models on CPU with this checkout's Python ($PYTHON), a pipeline check.
set -u
export LONGRUN_T0=$(date +%s)   # the time budget counts from here (setup included)
PHASE=${1:?usage: longrun.sh 1|2 [MODELS]}
MODELS=${2:-${LONGRUN_MODELS:-}}
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
RES=${LONGRUN_RESULTS:-/tmp/longrun-out}/phase$PHASE
rm -rf "$RES"
${PYTHON:-python3} benchmarks/device/longrun.py --phase "$PHASE" --out "$RES" ${LONGRUN_DATA:+--data "$LONGRUN_DATA"} \
  ${MODELS:+--models "$MODELS"}
rc=$?
[ -d "$RES" ] && { tar -C "$RES" -czf "$OUT/longrun_phase$PHASE.tgz" . ; cp "$RES"/longrun_phase*.md "$OUT/" 2>/dev/null; }
[ "${LONGRUN_TINY:-0}" != 1 ] && { du -sh /tmp/longrun/ckpt/* 2>/dev/null; df -h /tmp | tail -1; }
exit $rc
