# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/host_profile.py under torchrun on CPU (gloo, TP = 2, the tiny Memory+ preset):
every rank writes its report, with the steps from HOST_PROFILE_FROM on and this package's
training functions in it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_each_rank_writes_its_host_profile(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), HOST_PROFILE_FROM="3", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "benchmarks/host_profile.py", "--preset", "tiny",
                        "--steps", "4", "--tp", "2", "--tensorboard-dir", "", "--eval-iters", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        text = (tmp_path / "out" / f"host_rank{rank}.txt").read_text()
        m = re.match(rf"rank {rank}: (\d+) profiled steps, wall s \[([\d., ]+)\]", text)
        assert m and m.group(1) == "2", text[:300]        # steps 3 and 4
        assert all(float(w) > 0 for w in m.group(2).split(","))
        assert "Ordered by: internal time" in text and "Ordered by: cumulative time" in text
        assert "/megatron_memory/" in text                # this package's functions are ranked
