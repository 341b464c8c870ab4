# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/count_layer_ops.py: the torch ops one Memory+ layer dispatches per forward +
backward on its Triton path. A launch budget: at micro-batch 1 training is host-bound and every
op is a kernel launch (benchmarks/RESULTS.md run 20), so an added op must be a conscious change
of this number, not a silent one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# 215 before the query BatchNorm's written-out backward (query_norm._TokenBatchNorm), 186 after;
# 130 with the query BatchNorm and QK-norm of the query fused (kernels/query_norm_train.py);
# 121 with the search backward's gradient scatter fused (bf16_search._score_grad_kernel); 119
# with the weights' softmax in the search's product step and its backward in that scatter; 102
# with the keys' QK-norm as one op (kernels/key_norm.py; on CPU torch's rms_norm decomposes).
MEMORY_LAYER_OPS = 102


def test_memory_layer_stays_within_its_launch_budget():
    # Its own process: the script sets TRITON_INTERPRET before Triton is imported.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "count_layer_ops.py"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(got["areas"].values()) == got["memory"]          # every op attributed once
    assert got["ffn"] == 16                                      # fc1, silu*, fc2 and their backward
    assert got["memory"] <= MEMORY_LAYER_OPS, (
        f"the Memory+ layer now dispatches {got['memory']} ops per forward+backward (budget "
        f"{MEMORY_LAYER_OPS}): {got['areas']}")
    assert got["areas"]["lookup backward: segment plan"] > 0
    # training with BatchNorm and QK-norm takes the fused op: no torch ops of query_norm.py
    assert got["areas"]["query BatchNorm + QK-norm (fused, launch code)"] > 0
    assert "query BatchNorm / centring" not in got["areas"]
