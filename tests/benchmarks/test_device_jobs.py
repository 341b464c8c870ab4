# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The device-side helpers on CPU: device/jobs.sh runs jobs side by side, each with its own GPUs
and OUT, kills a job past the limit with its whole process group and returns one tarball; the
long run's training command uses the project's launcher when a model takes several GPUs, and a
run a few steps from its end at its deadline finishes instead of stopping."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
import longrun  # noqa: E402
from tests.benchmarks.procs import alive  # noqa: E402


def test_jobs_run_side_by_side_and_the_limit_kills_a_whole_job(tmp_path):
    (tmp_path / "benchmarks" / "device").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "device" / "jobs.sh", tmp_path / "benchmarks" / "device")
    # the device setup (wheels, nvidia-smi) replaced by a line the output must show
    (tmp_path / "benchmarks" / "device" / "setup.sh").write_text("echo setup done\n")
    out = tmp_path / "out"
    quick = 'echo "gpus=$CUDA_VISIBLE_DEVICES out=$OUT" > $OUT/result.txt; echo quick done'
    stuck = "bash -c 'sleep 4567 & sleep 4568'"  # a child that outlives its parent shell
    t0 = time.time()
    proc = subprocess.run(["bash", "benchmarks/device/jobs.sh", "6", f"0,1 quick {quick}",
                           f"2 stuck {stuck}"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out)})
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 30
    assert "setup done" in proc.stdout and "quick done" in proc.stdout
    assert "job stuck: killed at the 6 s limit" in proc.stdout
    time.sleep(0.5)
    assert not alive("sleep 456[78]")
    with tarfile.open(out / "jobs.tgz") as tar:
        names = set(tar.getnames())
        result = tar.extractfile("./quick/result.txt").read().decode()
    assert {"./quick/console.log", "./stuck/console.log"} <= names
    assert result.strip() == "gpus=0,1 out=/tmp/jobs/quick"


def test_long_run_trains_through_the_launcher_on_several_gpus(tmp_path):
    plan = longrun.make_plan(tiny=True)
    run = longrun.Run(tmp_path / "state", tmp_path / "data")
    memory = longrun.parse_models("memory", plan)[0]
    one = longrun.train_command(plan, run, memory, exit_at=None)
    assert one[1:3] == ["-m", "megatron_memory.train"]
    plan.gpus = 2
    two = longrun.train_command(plan, run, memory, exit_at=7)
    assert two[1:7] == ["-m", "megatron_memory.launch.run", "torchrun", "--nproc-per-node", "2",
                        "--"]
    assert two[7:] == one[3:] + ["--exit-interval", "7"]  # the same training flags


def test_a_run_near_its_end_finishes_past_its_deadline():
    ext = longrun.extension
    assert ext(593, 600, 0.5, now=100.0, hard=200.0) == 8.5            # 7 steps: finish
    assert ext(500, 600, 0.5, now=100.0, hard=200.0) == 0.0            # 55 s > FINISH_S: stop
    assert ext(593, 600, 0.5, now=195.0, hard=200.0) == 0.0            # past the hard deadline
    assert ext(593, 600, None, now=100.0, hard=200.0) == 0.0           # no rate seen yet
    assert ext(600, 600, 0.5, now=100.0, hard=200.0) == 0.0            # already done
