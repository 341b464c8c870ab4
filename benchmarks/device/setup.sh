#!/usr/bin/env bash
# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
# The one set-up of every device script (sourced, from the repository root):
#  1. Python packages the device image lacks, from the carried .whl folder into /tmp/site:
#     megatron-core and the few the trainer imports, each only when its import fails (safe to
#     source again: jobs.sh runs it before its jobs, whose scripts source it too, so concurrent
#     jobs never write /tmp/site at the same time); DEVICE_ALL_WHEELS=1 installs every carried
#     wheel (deepspeed and its dependencies for the launcher runs).
#  2. This checkout as the package megatron_memory: the repository folders kernels/, configs/,
#     tools/ and launch/ are its sub-packages (pyproject's package-dir), which a plain PYTHONPATH
#     does not map; /tmp/megatron-memory/megatron_memory links them as an install would, with no
#     pip and no setuptools needed. The links point into this checkout: edits show at once.
#  3. PYTHONPATH, unbuffered output, and one line naming the GPU and the stack's versions.
if [ "${DEVICE_ALL_WHEELS:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
else
  export PYTHONPATH=/tmp/site
  python3 -c "import megatron.core" 2>/dev/null || \
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/megatron_core*.whl || return 1
  for pair in tokenizers:tokenizers tensorboard:tensorboard google.protobuf:protobuf absl:absl_py; do
    python3 -c "import ${pair%%:*}" 2>/dev/null || \
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/${pair##*:}-*.whl
  done
fi
PKG=/tmp/megatron-memory/megatron_memory
rm -rf /tmp/megatron-memory && mkdir -p "$PKG"
for entry in "$PWD"/megatron_memory/*; do ln -s "$entry" "$PKG/"; done
for sub in kernels configs tools launch; do ln -s "$PWD/$sub" "$PKG/$sub"; done
export PYTHONPATH=/tmp/site:/tmp/megatron-memory:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton, megatron_memory.kernels as k; print(sys.version.split()[0], torch.__version__, triton.__version__, k.__file__)"
