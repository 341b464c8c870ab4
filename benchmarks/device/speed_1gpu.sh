#!/usr/bin/env bash
# One 1-GPU device call (issue 10): GPU tests of the search kernels, then the Memory+ layer vs
# dense FFN with the fp32 and bf16 searches, the search alone, and a kernel breakdown.
set -u
source benchmarks/device/setup.sh || exit 1
timeout 180 python3 -m pytest -q -x tests/kernels/test_bf16_search.py tests/kernels/test_product_key.py \
  -k "gpu" 2>&1 | tail -6
timeout 330 python3 benchmarks/bench_memory_layer.py --profile --rep-ms 150 2>&1 | tail -75
