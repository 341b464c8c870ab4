# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Training with ``train.cuda_graph_memory`` (megatron_memory/model/graphs.py; on by default with CUDA,
bf16 and PP = 1).

GPU (skips on CPU): the same losses and gradient norms as eager training, step by step. Global
batch 8 in micro-batches of 2 and two eager warm-up passes per layer, so the graphs replay from
the first step on (from the second at DP = 2). Layouts:
- one GPU;
- two GPUs, TP = 2 + SP: NCCL collectives inside the graphs;
- two GPUs, DP = 2 with the distributed optimizer: DDP's overlapped parameter all-gather, whose
  forward pre-hooks a replay runs by hand.
Each run then destroys its process group, which hangs if a graph holding an NCCL collective
is still alive (``Trainer.close`` releases them); so does a run whose step raises (``fit``
releases them before the error propagates). CPU: one clear error, before any compute.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from tests.conftest import requires_cuda
from tests.parallel import workers


def _trainer(rank: int, world: int, port: int, cfg):
    """This rank's Trainer; the Trainer initialises the NCCL group from the environment."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron_memory.training.trainer import Trainer

    return Trainer(cfg, log=lambda line: None)


def _destroy_group_within(seconds: float, after: str) -> None:
    """Destroy the process group, failing (not blocking) if it hangs on a live graph."""
    done = threading.Event()
    threading.Thread(target=lambda: (dist.destroy_process_group(), done.set()), daemon=True).start()
    assert done.wait(seconds), f"destroy_process_group hung after {after}"


def _worker(rank: int, world: int, port: int, cfg, out_file: str) -> None:
    trainer = _trainer(rank, world, port, cfg)
    hist = trainer.fit()
    replays = sum(m.cuda_graph.replays for m in trainer.raw_model.memory_layers()
                  if m.cuda_graph is not None)
    if rank == 0:
        json.dump({"losses": hist.losses, "grad_norms": hist.grad_norms,
                   "value_grad_norms": hist.value_grad_norms, "replays": replays},
                  open(out_file, "w"))
    trainer.close()   # releases the graphs: NCCL cannot destroy a communicator they captured
    _destroy_group_within(120, "graphed training")


def _failing_worker(rank: int, world: int, port: int, cfg, out_file: str) -> None:
    """Training that raises at its third step, after the graphs replayed: fit releases them
    before the error propagates, and the process group can still be destroyed."""
    trainer = _trainer(rank, world, port, cfg)
    layers, step, replays = trainer.raw_model.memory_layers(), trainer.train_step, []

    def failing_step():
        if len(replays) == 2:
            raise RuntimeError("injected failure")
        replays.append(sum(m.cuda_graph.replays for m in layers))
        return step()

    trainer.train_step = failing_step
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.fit()
    assert replays[-1] > 0 and all(m.cuda_graph is None for m in layers)
    _destroy_group_within(120, "a failed graphed step")
    if rank == 0:
        json.dump({"replays": replays}, open(out_file, "w"))


def _spawn(worker, world: int, cfg, out) -> dict:
    """Run ``worker`` on ``world`` GPUs -> what rank 0 wrote to ``out``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(worker, args=(world, port, cfg, str(out)),
                                          nprocs=world, join=True, start_method="spawn")
    return json.load(open(out))


def _train(tmp, world: int, graphs: Optional[bool], **layout) -> dict:
    cfg = workers.tiny_config(steps=4, dp_batch=2, **layout, **{
        "train.global_batch_size": 8,
        "train.cuda_graph_memory": graphs})
    return _spawn(_worker, world, cfg, tmp / f"run_{world}_{graphs}.json")


def _assert_trains_alike(eager: dict, graphed: dict) -> None:
    assert graphed["replays"] > 0 and eager["replays"] == 0
    assert len(eager["losses"]) == 4
    for key in ("losses", "grad_norms", "value_grad_norms"):
        assert graphed[key] == pytest.approx(eager[key], rel=2e-3), key


@requires_cuda
def test_gpu_graphed_training_matches_eager(tmp_path):
    """The graphed run leaves train.cuda_graph_memory at its default: on with CUDA and bf16."""
    _assert_trains_alike(_train(tmp_path, 1, False), _train(tmp_path, 1, None))


@requires_cuda
@pytest.mark.parametrize("layout", [dict(tp=2, sp=True), dict(tp=1)], ids=["tp2-sp", "dp2-distopt"])
def test_gpu_2gpu_graphed_training_matches_eager(tmp_path, layout):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _assert_trains_alike(_train(tmp_path, 2, False, **layout), _train(tmp_path, 2, True, **layout))


@requires_cuda
def test_gpu_a_failed_step_releases_the_graphs(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    cfg = workers.tiny_config(steps=4, dp_batch=2, tp=2, sp=True, **{"train.global_batch_size": 8})
    assert _spawn(_failing_worker, 2, cfg, tmp_path / "failed.json")["replays"][-1] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error")
def test_cuda_graphs_on_cpu_is_one_clear_error():
    r = subprocess.run([sys.executable, "-m", "megatron_memory.train", "--cuda-graph-memory",
                        "--steps", "1", "--tensorboard-dir", ""],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "train.cuda_graph_memory needs CUDA" in r.stderr
    assert "Traceback" not in r.stderr
