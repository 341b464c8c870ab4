# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Launch ``megatron_memory.train`` on one or many nodes through torchrun, deepspeed or SLURM.

    python -m megatron_memory.launch.run torchrun  --nproc-per-node 8 [--nnodes 2 --node-rank 0 --master-addr H] -- TRAIN FLAGS
    python -m megatron_memory.launch.run deepspeed --hostfile hosts.txt [--nproc-per-node 8] [--node-rank R]     -- TRAIN FLAGS
    python -m megatron_memory.launch.run slurm     --nnodes 2 --nproc-per-node 8 [--partition P --time T]        -- TRAIN FLAGS

The training flags are validated against the world size (nodes x processes), and the data,
tokenizer and vocabulary checked, before anything starts. Paths among the training flags
(--data-path, --tokenizer, --tensorboard-dir, ...) and --hostfile are made absolute against the
current directory, so they mean the same on every node. The processes run in the launcher's
working directory and need no source checkout: ``-m megatron_memory.train`` is found the way
the launcher found this package (install, working directory or PYTHONPATH, all inherited).
``--dry-run`` prints the fully resolved command(s) (for SLURM: the batch script) and exits.
NCCL_NVLS_ENABLE=0 is exported: NVLink multicast is off (it can take down shared hosts).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from megatron_memory.cli import absolute_paths, config_from_args
from megatron_memory.config import STOP_FILE_ENV
from megatron_memory.training.preflight import check_inputs
from megatron_memory.errors import InputError, MegatronMemoryError, command

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """DeepSpeed hostfile lines 'host slots=N' -> [(host, N)]; '#' starts a comment."""
    if not Path(path).is_file():
        raise ValueError(f"--hostfile {path} not found")
    hosts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) > 2 or (len(parts) == 2 and not slots):
            raise ValueError(f"{path}:{n}: expected 'hostname slots=N', got {line!r}")
        try:
            hosts.append((parts[0], int(slots[0].split("=", 1)[1]) if slots else 1))
        except ValueError as err:
            raise ValueError(f"{path}:{n}: slots must be an integer in {line!r}") from err
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return hosts


def torchrun_command(a, node_rank: int) -> list[str]:
    cmd = [a.python, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc_per_node}"]
    if a.nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [f"--nnodes={a.nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={a.master_addr or '127.0.0.1'}:{a.master_port}", f"--rdzv-id={a.run_id}"]
    return cmd + ["-m", "megatron_memory.train", *a.train_args]


def deepspeed_command(a) -> list[str]:
    cmd = [a.python, "-m", "deepspeed.launcher.runner", f"--master_port={a.master_port}"]
    if a.hostfile:
        cmd += [f"--hostfile={a.hostfile}", f"--num_nodes={a.nnodes}"]
        if a.node_rank is not None:  # this node only, started on each node by hand: no ssh
            cmd += ["--no_ssh", f"--node_rank={a.node_rank}"]
        elif a.nnodes == 1:  # one host: DeepSpeed launches locally but would first try ssh to it
            cmd += ["--no_ssh_check"]
        master = a.master_addr or ("127.0.0.1" if a.nnodes == 1 else None)
        cmd += [f"--master_addr={master}"] if master else []
    cmd += [f"--num_gpus={a.nproc_per_node}", "--no_local_rank", "--module", "megatron_memory.train"]
    return cmd + list(a.train_args)


def _flag_value(args: list[str], flag: str) -> Optional[str]:
    """The value of ``--flag V`` or ``--flag=V`` in a training command line (last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def slurm_script(a) -> str:
    """An sbatch script: one torchrun per node (srun), rendezvous on the first node.

    Preemption-safe: ``--requeue``, and ``--signal`` asks for SIGUSR1 ``--requeue-lead`` seconds
    before the time limit. The batch shell then creates the stop file the training polls each
    step (it finishes the step, saves, exits 0) and requeues the job; a requeued job resumes
    from the latest checkpoint in --save (``--load`` is added once one exists)."""
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    save = _flag_value(a.train_args, "--save")
    resume = "${RESUME}" if save and _flag_value(a.train_args, "--load") is None else ""
    torchrun = [a.python, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc_per_node}",
                "--nnodes=$SLURM_NNODES", "--node-rank=$SLURM_NODEID", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=$MASTER_ADDR:{a.master_port}", "--rdzv-id=$SLURM_JOB_ID",
                "-m", "megatron_memory.train", *map(shlex.quote, a.train_args)] + ([resume] if resume else [])
    opts = [f"--nodes={a.nnodes}", "--ntasks-per-node=1", f"--gpus-per-node={a.nproc_per_node}",
            f"--job-name={a.job_name}", f"--output={a.job_name}-%j.out", "--requeue",
            f"--signal=B:USR1@{a.requeue_lead}"]
    opts += [f"--partition={a.partition}"] if a.partition else []
    opts += [f"--time={a.time}"] if a.time else []
    lines = ["#!/usr/bin/env bash", *(f"#SBATCH {o}" for o in opts), "set -euo pipefail",
             f"cd {shlex.quote(a.cwd)}",
             'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             f"export {env}",
             f'export {STOP_FILE_ENV}="$PWD/.stop-$SLURM_JOB_ID"',
             f'rm -f "${STOP_FILE_ENV}"']
    if resume:
        tracker = shlex.quote(str(Path(save) / "latest_checkpointed_iteration.txt"))
        lines += ["export RESUME=", f"[ -f {tracker} ] && RESUME={shlex.quote('--load ' + save)}"]
    lines += [
        "REQUEUE=0",
        "# SIGUSR1 before the time limit, SIGTERM on preemption: ask the training to save and stop",
        f'stop() {{ echo "signal: saving and stopping, then requeueing job $SLURM_JOB_ID"; '
        f'touch "${STOP_FILE_ENV}"; REQUEUE=1; }}',
        "trap stop USR1 TERM",
        "srun --kill-on-bad-exit=1 bash -c " + shlex.quote(" ".join(torchrun)) + " &",
        "pid=$!",
        "rc=0",
        "# wait returns early when a trapped signal arrives: wait until srun has really ended",
        'while :; do wait "$pid" && rc=0 || rc=$?; kill -0 "$pid" 2>/dev/null || break; done',
        f'rm -f "${STOP_FILE_ENV}"',
        'if [ "$REQUEUE" = 1 ] && [ "$rc" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$rc"', ""]
    return "\n".join(lines)


def parse(argv: list[str]):
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    else:
        train_args = []
    ap = argparse.ArgumentParser(prog="python -m megatron_memory.launch.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("launcher", choices=["torchrun", "deepspeed", "slurm"])
    ap.add_argument("--nnodes", type=int, default=None, help="nodes (default 1; deepspeed: from the hostfile)")
    ap.add_argument("--nproc-per-node", type=int, default=None,
                    help="processes (GPUs) per node (default: visible GPUs, else 1; deepspeed: hostfile slots)")
    ap.add_argument("--node-rank", type=int, default=None,
                    help="this node's rank: torchrun (default: all, with --dry-run), or deepspeed "
                         "started on each node without ssh (--no_ssh)")
    ap.add_argument("--master-addr", default=None,
                    help="rendezvous host, the first node (required for torchrun on several nodes; "
                         "127.0.0.1 runs several 'nodes' on this machine)")
    ap.add_argument("--master-port", type=int, default=29500, help="rendezvous port")
    ap.add_argument("--run-id", default="megatron-memory", help="torchrun rendezvous id")
    ap.add_argument("--hostfile", default=None, help="deepspeed hostfile ('host slots=N' lines)")
    ap.add_argument("--partition", default=None, help="slurm partition")
    ap.add_argument("--time", default=None, help="slurm time limit, e.g. 24:00:00")
    ap.add_argument("--requeue-lead", type=int, default=300,
                    help="slurm: seconds before the time limit to save, stop and requeue (default 300)")
    ap.add_argument("--job-name", default="megatron-memory", help="slurm job name")
    ap.add_argument("--python", default=sys.executable, help="python that has megatron-memory installed")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved command(s) and exit")
    a = ap.parse_args(argv)
    a.cwd = os.getcwd()
    a.train_args = absolute_paths(train_args, a.cwd)
    a.hostfile = os.path.abspath(a.hostfile) if a.hostfile else None
    return a


def resolve(a) -> None:
    """Fill defaults, check the layout against the world size, raise ValueError if inconsistent."""
    if a.launcher == "deepspeed" and a.hostfile:
        hosts = read_hostfile(a.hostfile)
        if len({s for _, s in hosts}) != 1:
            raise ValueError(f"{a.hostfile}: every host needs the same slots, got {hosts}")
        a.nnodes = a.nnodes or len(hosts)
        a.nproc_per_node = a.nproc_per_node or hosts[0][1]
        if a.nnodes > len(hosts):
            raise ValueError(f"--nnodes {a.nnodes} but {a.hostfile} lists {len(hosts)} hosts")
        if a.master_addr is None and a.nnodes > 1:
            a.master_addr = hosts[0][0]
    a.nnodes = a.nnodes or 1
    if a.nproc_per_node is None:
        import torch  # lazy: only to count GPUs; --help and explicit layouts skip loading torch

        a.nproc_per_node = max(1, torch.cuda.device_count())
    if a.nnodes < 1 or a.nproc_per_node < 1:
        raise ValueError("--nnodes and --nproc-per-node must be >= 1")
    if a.launcher == "deepspeed" and a.nnodes > 1 and not a.hostfile:
        raise ValueError("deepspeed on several nodes needs --hostfile")
    if a.launcher == "torchrun" and a.nnodes > 1 and a.master_addr is None and not a.dry_run:
        raise ValueError("torchrun on several nodes needs --master-addr (the first node's address)")
    if a.master_port < 1 or a.master_port > 65535:
        raise ValueError(f"--master-port {a.master_port} is not a port (1..65535)")
    cfg, _ = config_from_args(a.train_args)
    # data, tokenizer, vocab: one line. cuda=True: this host may lack the workers' GPUs, whose
    # CUDA-only flags each worker checks itself
    check_inputs(cfg, world_size=a.nnodes * a.nproc_per_node, cuda=True)


@command
def main(argv=None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    try:
        resolve(a)
    except MegatronMemoryError:
        raise
    except (ValueError, KeyError) as err:  # a hostfile, address or port as given
        raise InputError(str(err)) from err
    env_line = " ".join(f"{k}={v}" for k, v in ENV.items())
    if a.launcher == "slurm":
        script = slurm_script(a)
        if a.dry_run:
            print(script)
            return 0
        path = Path(a.cwd) / f"{a.job_name}.sbatch"
        path.write_text(script)
        return subprocess.call(["sbatch", str(path)])
    if a.launcher == "deepspeed":
        cmds = [deepspeed_command(a)]
    else:
        ranks = range(a.nnodes) if a.node_rank is None else [a.node_rank]
        cmds = [torchrun_command(a, r) for r in ranks]
    if a.dry_run:
        for i, cmd in enumerate(cmds):
            where = f"# node {i}\n" if len(cmds) > 1 else ""
            print(f"{where}{env_line} {shlex.join(cmd)}")
        return 0
    if len(cmds) > 1:
        raise InputError("torchrun on several nodes: run this on each node with --node-rank")
    return subprocess.call(cmds[0], env={**os.environ, **ENV})


if __name__ == "__main__":
    sys.exit(main())
