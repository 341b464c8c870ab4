#!/usr/bin/env bash
# Sourced by the device_* scripts: megatron-core from .whl, and the few Python packages the
# trainer imports if the device image lacks them (each wheel only when its import fails). Safe to
# source again (device_jobs.sh runs it once before its jobs, whose scripts source it too): what
# imports already is not reinstalled, so concurrent jobs never write /tmp/site at the same time.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import megatron.core" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/megatron_core*.whl || return 1
for pair in tokenizers:tokenizers tensorboard:tensorboard google.protobuf:protobuf absl:absl_py; do
  python3 -c "import ${pair%%:*}" 2>/dev/null || \
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/${pair##*:}-*.whl
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
