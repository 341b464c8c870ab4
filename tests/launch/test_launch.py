# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Launchers: resolved commands for 2 nodes x 8 GPUs, clear errors, and a real 4-process CPU run
(PP=2 x TP=2) through torchrun (multi-node and deepspeed runs: test_multinode.py)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_memory.launch.run import main, read_hostfile
from tests.launch.test_multinode import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--preset", "8b-memory", "--tp", "2", "--pp", "4"]


def dry(capsys, *argv) -> str:
    assert main([*argv, "--dry-run", "--python", "python3", "--", *TRAIN]) == 0
    return capsys.readouterr().out


def test_torchrun_two_nodes(capsys):
    out = dry(capsys, "torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--master-addr", "n0")
    lines = [l for l in out.splitlines() if not l.startswith("#")]
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert line.startswith("NCCL_NVLS_ENABLE=0 ")
        assert (f"python3 -m torch.distributed.run --nproc-per-node=8 --nnodes=2 --node-rank={rank} "
                "--rdzv-backend=c10d --rdzv-endpoint=n0:29500 --rdzv-id=megatron-memory "
                "-m megatron_memory.train --preset 8b-memory --tp 2 --pp 4") in line


def test_deepspeed_hostfile(capsys, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("n0 slots=8  # first\nn1 slots=8\n")
    out = dry(capsys, "deepspeed", "--hostfile", str(hosts))
    assert out.strip().endswith(
        f"python3 -m deepspeed.launcher.runner --master_port=29500 --hostfile={hosts} --num_nodes=2 "
        "--master_addr=n0 --num_gpus=8 --no_local_rank --module megatron_memory.train "
        "--preset 8b-memory --tp 2 --pp 4")


def test_slurm_script(capsys):
    out = dry(capsys, "slurm", "--nnodes", "2", "--nproc-per-node", "8", "--partition", "gpu")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu"):
        assert line in out.splitlines()
    assert any(l.startswith("export NCCL_NVLS_ENABLE=0 ") for l in out.splitlines())
    srun = next(l for l in out.splitlines() if l.startswith("srun "))
    assert re.search(r"--nnodes=\$SLURM_NNODES --node-rank=\$SLURM_NODEID .*"
                     r"--rdzv-endpoint=\$MASTER_ADDR:29500 .*-m megatron_memory.train "
                     r"--preset 8b-memory --tp 2 --pp 4", srun)


def test_layout_and_hostfile_errors(capsys, tmp_path):
    assert main(["torchrun", "--nproc-per-node", "3", "--dry-run", "--", "--tp", "2"]) == 2
    assert "world size 3 is not divisible by tp*pp = 2" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.write_text("n0 gpus=8\n")
    assert main(["deepspeed", "--hostfile", str(bad), "--dry-run"]) == 2
    assert "expected 'hostname slots=N'" in capsys.readouterr().err
    assert main(["deepspeed", "--nnodes", "2", "--nproc-per-node", "8", "--dry-run"]) == 2
    assert "needs --hostfile" in capsys.readouterr().err
    with pytest.raises(ValueError, match="slots must be an integer"):
        bad.write_text("n0 slots=x\n")
        read_hostfile(str(bad))


# The deepspeed launcher's real runs (localhost hostfile; two nodes without ssh) are in
# test_multinode.py, at TP=2 x DP=2; this one covers PP through the launcher.
@pytest.mark.parametrize("launcher", ["torchrun"])
def test_real_four_process_cpu_run(launcher):
    r = subprocess.run([sys.executable, "-m", "megatron_memory.launch.run", launcher, "--nproc-per-node", "4",
                        "--master-port", free_port(), "--",
                        "--tp", "2", "--pp", "2", "--num-layers", "4", "--memory-layers", "1", "3",
                        "--steps", "3", "--log-interval", "1", "--tensorboard-dir", ""],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "layout     TP=2 PP=2 DP=1" in r.stdout
    steps = re.findall(r"step\s+(\d)/3 \| loss\s+([\d.]+)", r.stdout)
    assert [s for s, _ in steps] == ["1", "2", "3"]
    assert float(steps[-1][1]) < float(steps[0][1])
