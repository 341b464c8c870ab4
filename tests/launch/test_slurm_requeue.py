# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The SLURM script's preemption path, run with local stand-ins for srun and scontrol: SIGUSR1
before the time limit makes the training finish its step, save and exit 0, and the job requeue
itself; the requeued job resumes from the checkpoint and finishes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from megatron_memory.checkpointing import checkpoint
from tests.launch.test_multinode import env, free_port, stand_ins

SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && echo localhost
[[ "$1" == requeue ]] && echo "requeue $2" >> "$REQUEUE_LOG"
exit 0
"""
TRAIN = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
         "--memory-layers", "1", "--memory-n-keys", "16", "--memory-k", "4", "--memory-k-dim", "16",
         "--seq-length", "32", "--micro-batch-size", "2", "--tensorboard-dir", "",
         "--eval-iters", "0", "--log-interval", "1", "--steps", "100", "--save", "ck"]


def test_usr1_saves_stops_requeues_and_the_requeued_job_resumes(tmp_path):
    bin_ = stand_ins(tmp_path, SCONTROL)
    script = subprocess.run([sys.executable, "-m", "megatron_memory.launch.run", "slurm", "--nnodes", "1",
                             "--nproc-per-node", "1", "--master-port", free_port(), "--dry-run", "--", *TRAIN],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    assert "#SBATCH --requeue" in script.stdout and "#SBATCH --signal=B:USR1@300" in script.stdout
    (tmp_path / "job.sbatch").write_text(script.stdout)
    job_env = {**env(), "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_NNODES": "1",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "77",
               "REQUEUE_LOG": str(tmp_path / "requeue.log")}
    job = subprocess.Popen(["bash", "job.sbatch"], cwd=tmp_path, env=job_env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in job.stdout:
        if line.startswith("step     2/"):
            job.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell (--signal=B:USR1)
            break
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    step = checkpoint.read_tracker(tmp_path / "ck")
    assert step is not None and 2 <= step < 100
    assert f"stopping after step {step} (stop file {tmp_path}/.stop-77)" in out
    assert (tmp_path / "requeue.log").read_text() == "requeue 77\n"
    assert not (tmp_path / ".stop-77").exists()
    # SLURM starts the same script again: it finds the checkpoint and resumes.
    again = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env=job_env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"loaded step {step} (model, optimizer, schedule, data position)" in again.stdout
    assert checkpoint.read_tracker(tmp_path / "ck") == 100
    assert (tmp_path / "requeue.log").read_text() == "requeue 77\n"  # finished: no requeue
