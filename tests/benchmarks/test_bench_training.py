# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""bench_training's runner on CPU: a finished run's figures are parsed from its log; a run past
its time limit is killed with every rank (no orphan keeps running) and its log is kept."""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_training  # noqa: E402
from tests.benchmarks.procs import alive  # noqa: E402

TINY = ["--preset", "tiny", "--num-layers", "2", "--memory-layers", "1", "--tensorboard-dir=",
        "--eval-iters", "0", "--log-interval", "1", "--micro-batch-size", "2"]


def test_finished_run_is_parsed(tmp_path):
    res = bench_training.run_one("torchrun", 1, TINY + ["--steps", "5"], tmp_path / "ok.log", 300)
    assert res["rc"] == 0, (tmp_path / "ok.log").read_text()[-2000:]
    assert res["tok_s"] > 0 and len(res["loss"]) == 2
    assert "step     5/5" in (tmp_path / "ok.log").read_text()


def test_timeout_kills_every_rank_and_keeps_the_log(tmp_path):
    marker = "--seed 987654"  # only this run's processes carry it
    t0 = time.time()
    res = bench_training.run_one("torchrun", 2, TINY + ["--steps", "100000", *marker.split()],
                                 tmp_path / "cut.log", 25)
    assert time.time() - t0 < 60 and res["rc"] != 0
    log = (tmp_path / "cut.log").read_text()
    assert "killed after 25 s" in log and "megatron_memory.launch.run" in log.splitlines()[0]
    time.sleep(1)
    assert not alive("seed 987654")
