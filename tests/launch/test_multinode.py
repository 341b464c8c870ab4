# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Multi-node, proven on one machine: 2 'nodes' x 2 CPU processes through the launcher's own
multi-node paths (two torchrun agents joined by a localhost rendezvous; the SLURM script with
``srun`` and ``scontrol`` replaced by local stand-ins), the deepspeed launcher with a localhost
hostfile, each training TP=2 x DP=2 for a few steps. Also: paths relative to the user's directory."""
from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

from megatron_memory.launch.run import main

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--tp", "2", "--num-layers", "4", "--hidden-size", "64", "--memory-layers", "1", "3",
         "--micro-batch-size", "2", "--train-iters", "3", "--log-interval", "1", "--eval-iters", "1",
         "--tensorboard-dir", "tb"]  # relative: must land in the caller's directory
SRUN = """#!/usr/bin/env bash
# srun stand-in: the command once per node (SLURM_NNODES), SLURM_NODEID set, all in parallel.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && echo localhost
"""


def free_port() -> str:
    """A TCP port nobody listens on now (bound to port 0 and read back): runs beside each other
    or beside other jobs on the machine do not meet on a fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_memory.launch.run", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def check_run(out: str, tmp: Path) -> None:
    assert "layout     TP=2 PP=1 DP=2" in out, out[-3000:]
    steps = re.findall(r"step\s+(\d)/3 \| loss\s+([\d.]+)", out)
    assert [s for s, _ in steps] == ["1", "2", "3"], out[-3000:]
    assert list((tmp / "tb").glob("events.out.tfevents.*"))  # relative path: the user's directory


def stand_ins(folder: Path, scontrol: str = SCONTROL) -> Path:
    """folder/bin holding the srun and scontrol stand-ins (put it first on PATH)."""
    bin_ = folder / "bin"
    bin_.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", scontrol)):
        (bin_ / name).write_text(body)
        (bin_ / name).chmod((bin_ / name).stat().st_mode | stat.S_IEXEC)
    return bin_


def run_two_nodes(tmp_path: Path, *launch_args: str) -> None:
    """Both nodes' launchers at once (node ranks 0 and 1), as two machines would start them."""
    procs = [subprocess.Popen(launcher(*launch_args[:1], "--node-rank", str(r), *launch_args[1:], "--", *TRAIN),
                              cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    check_run("".join(outs), tmp_path)


def test_torchrun_two_nodes_localhost_rendezvous(tmp_path):
    run_two_nodes(tmp_path, "torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                  "--master-port", free_port(), "--run-id", "t2x2")


def test_deepspeed_localhost_hostfile(tmp_path):
    """One host: DeepSpeed's local launch, no ssh."""
    (tmp_path / "hosts").write_text("localhost slots=4\n")
    r = subprocess.run(launcher("deepspeed", "--hostfile", "hosts", "--master-port", free_port(), "--", *TRAIN),
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_run(r.stdout, tmp_path)


def test_deepspeed_two_nodes_without_ssh(tmp_path):
    """Two hosts of a hostfile (both this machine), each node's launcher started with its rank."""
    (tmp_path / "hosts").write_text("127.0.0.1 slots=2\nlocalhost slots=2\n")
    run_two_nodes(tmp_path, "deepspeed", "--hostfile", "hosts", "--master-port", free_port())


def test_slurm_script_runs_with_srun_stand_in(tmp_path):
    bin_ = stand_ins(tmp_path)
    script = subprocess.run(launcher("slurm", "--nnodes", "2", "--nproc-per-node", "2", "--master-port", free_port(),
                                     "--dry-run", "--", *TRAIN),
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    assert f"cd {tmp_path}" in script.stdout.splitlines()
    (tmp_path / "job.sbatch").write_text(script.stdout)
    r = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**env(), "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_NNODES": "2",
                            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_run(r.stdout, tmp_path)


def test_paths_are_resolved_against_the_users_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["torchrun", "--nproc-per-node", "1", "--dry-run", "--", "--data-path", "mydata/d",
                 "--tokenizer", "mydata/tok.json"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: data.tokenizer: no tokenizer at {tmp_path / 'mydata/tok.json'} " \
                          "(expected a tokenizer.json file or a directory holding one)"
    assert main(["torchrun", "--nproc-per-node", "1", "--dry-run", "--", "--tensorboard-dir", "tb",
                 "--save", "ck"]) == 0
    out = capsys.readouterr().out
    assert f"--tensorboard-dir {tmp_path / 'tb'} --save {tmp_path / 'ck'}" in out
    assert main(["deepspeed", "--hostfile", "hosts", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --hostfile {tmp_path / 'hosts'} not found"


def test_calculator_world_size_zero(capsys):
    from megatron_memory.tools.memory_calculator import main as calculator

    assert calculator(["--world-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --world-size must be > 0, got 0"
