# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Exact resume and resharding through dist_checkpointing (CPU, gloo, fixed seeds).

Exact resume after SIGKILL at a realistic length (20 + 20 steps, four layouts) is in
tests/training/test_reproducible.py. Here: a save does not disturb the run; reshard: a TP=2 x PP=2 checkpoint continues at TP=1 and the reverse; the
next step's loss equals the saving layout's own next step within fp32 tolerance. DP=2 <-> DP=1
continues exactly, the optimizer kind following the checkpoint; a DP=2 save is written by both DP
ranks (fully parallel save).
"""
from __future__ import annotations

import json

import pytest

from megatron_memory.checkpointing import checkpoint
from tests.parallel import workers
from tests.parallel.dist_utils import run_ranks

N = 2
LAYOUTS = {  # name: (world, tp, pp, micro-batch per DP rank); global batch 8 everywhere
    "tp1": (1, 1, 1, 4),
    "dp2": (2, 1, 1, 2),
}


# Layouts only loaded into: DP=2 <-> DP=1 with the same micro-batches (the query BatchNorm's
# statistics are per micro-batch, so only then is the next loss comparable exactly).
TARGETS = {"tp1mb2": (1, 1, 1, 2), "dp2mb4": (2, 1, 1, 4)}


def _cfg(name, **train):
    world, tp, pp, mbs = {**LAYOUTS, **TARGETS}.get(name, (4, 2, 2, 4))
    changes = {f"train.{k}": v for k, v in train.items()}
    return world, workers.tiny_config(tp=tp, pp=pp, dp_batch=mbs, **{"train.global_batch_size": 8},
                                      **changes)


def _launch(tmp, runs) -> dict:
    """Train each ``(name, tag, train changes)`` of ``runs``, one launch per world size
    (``workers.several``: process start and imports are most of a tiny run's cost) ->
    {(name, tag): what workers.train wrote}."""
    by_world: dict = {}
    for name, tag, train in runs:
        world, cfg = _cfg(name, **train)
        by_world.setdefault(world, []).append((workers.train, cfg, str(tmp / f"{name}_{tag}.json")))
    for world, jobs in sorted(by_world.items()):
        run_ranks(world, workers.several, jobs, tp=0)
    return {(name, tag): json.load(open(tmp / f"{name}_{tag}.json")) for name, tag, _ in runs}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def runs(tmp) -> dict:
    """Every training the tests compare, in two phases of one launch per world size:
    - saves: 2N steps straight saving at N (a save must not disturb the run), and the DP=2
      rank-0-only, one-write-thread and async saves;
    - loads: the reshards, and the runs continued from each save."""
    def at_n(run):
        return str(checkpoint.iteration_dir(tmp / run, N))

    out = _launch(tmp, [(name, "straight", dict(steps=2 * N, save=str(tmp / f"{name}_straight"),
                                                save_interval=N)) for name in (*LAYOUTS, "tp2pp2")] + [
        ("dp2", "rank0", dict(steps=2 * N, exit_interval=N, save=str(tmp / "dp2_rank0"),
                              fully_parallel_save=False)),
        ("tp1", "one_thread", dict(steps=2 * N, exit_interval=N, save=str(tmp / "tp1_one_thread"),
                                   checkpoint_write_threads=1)),
        ("dp2", "async", dict(steps=2 * N, save=str(tmp / "dp2_async"), save_interval=N, async_save=True))])
    out.update(_launch(tmp, [
        ("tp1", "from_tp2pp2", dict(steps=N + 1, load=at_n("tp2pp2_straight"))),
        ("tp2pp2", "from_tp1", dict(steps=N + 1, load=at_n("tp1_straight"))),
        *(("tp1mb2", f"from_{run}", dict(steps=N + 1, load=at_n(run))) for run in ("dp2_straight", "dp2_rank0")),
        *(("tp1", f"from_{run}", dict(steps=2 * N, load=at_n(run))) for run in ("tp1_straight", "tp1_one_thread")),
        ("dp2", "spread_load", dict(steps=2 * N, load=at_n("dp2_straight"))),
        ("dp2", "alone_load", dict(steps=2 * N, load=at_n("dp2_straight"), fully_parallel_load=False)),
        ("dp2mb4", "from_tp1", dict(steps=N + 1, load=at_n("tp1_straight"))),
        ("dp2", "from_async", dict(steps=2 * N, load=at_n("dp2_async")))]))
    return out


@pytest.fixture(scope="module")
def straight(runs) -> dict:
    return {name: runs[name, "straight"] for name in (*LAYOUTS, "tp2pp2")}


@pytest.mark.parametrize("saved, loaded", [("tp2pp2", "tp1"), ("tp1", "tp2pp2")])
def test_reshard_continues_the_saved_run(runs, straight, saved, loaded):
    got = runs[loaded, f"from_{saved}"]
    ref = straight[saved]["losses"][N]
    assert got["losses"][0] == pytest.approx(ref, rel=1e-5)
    # and not trivially: the next step's loss differs from the step before the save
    assert abs(straight[saved]["losses"][N - 1] - ref) > 1e-3


def _per_rank(ckpt, measure) -> dict:
    """torch_dist data files are __<rank>_<i>.distcp: sum of measure(file) per global rank."""
    out: dict = {}
    for f in ckpt.glob("__*_*.distcp"):
        rank = int(f.name[2:].split("_")[0])
        out[rank] = out.get(rank, 0) + measure(f)
    return out


def _bytes_per_rank(ckpt) -> dict:
    return _per_rank(ckpt, lambda f: f.stat().st_size)


def _files_per_rank(ckpt) -> dict:
    return _per_rank(ckpt, lambda f: 1)


def test_fully_parallel_save_spreads_writes_over_dp(tmp, runs, straight):
    """DP=2: the default save has both DP ranks write a real share of the checkpoint (the
    weights and the gathered optimizer state are held by both); with it off, DP rank 0 writes
    nearly everything. Either checkpoint continues the run exactly at DP=1."""
    parallel = _bytes_per_rank(checkpoint.iteration_dir(tmp / "dp2_straight", N))
    rank0 = _bytes_per_rank(checkpoint.iteration_dir(tmp / "dp2_rank0", N))
    total = sum(parallel.values())
    assert sum(rank0.values()) == pytest.approx(total, rel=0.05)   # the same content
    assert min(parallel.get(0, 0), parallel.get(1, 0)) > 0.25 * total
    assert rank0.get(1, 0) < 0.05 * total
    ref = straight["dp2"]["losses"][N]
    for name in ("dp2_straight", "dp2_rank0"):
        got = runs["tp1mb2", f"from_{name}"]
        assert got["losses"][0] == pytest.approx(ref, rel=1e-6)


def test_write_threads_split_a_ranks_files_and_resume_exactly(tmp, runs, straight):
    """The default save writes each rank's share with 4 threads, one file each; one thread
    writes one file of the same content. Both continue the run bit-identically."""
    threaded = checkpoint.iteration_dir(tmp / "tp1_straight", N)
    assert _files_per_rank(threaded) == {0: 4}
    single = checkpoint.iteration_dir(tmp / "tp1_one_thread", N)
    assert _files_per_rank(single) == {0: 1}
    assert _bytes_per_rank(single)[0] == pytest.approx(_bytes_per_rank(threaded)[0], rel=0.01)
    for ckpt in (threaded, single):
        got = runs["tp1", f"from_{ckpt.parent.name}"]
        assert got["losses"] == straight["tp1"]["losses"][N:]


def test_fully_parallel_load_spreads_reads_over_dp(runs, straight):
    """DP=2: by default each DP rank reads a share of what both need (weights, gathered
    optimizer state) and receives the rest by broadcast; off, each reads all it needs. Both
    continue the run bit-identically."""
    spread, alone = runs["dp2", "spread_load"], runs["dp2", "alone_load"]
    for got in (spread, alone):
        assert got["losses"] == straight["dp2"]["losses"][N:]
    need = alone["read_bytes"]
    assert need[0] > 0 and need[0] == need[1]
    assert sum(spread["read_bytes"]) >= 0.99 * need[0]           # nothing a rank needs is skipped
    assert max(spread["read_bytes"]) < 0.75 * need[0]            # and the reads are shared


def test_dp_change_keeps_the_checkpoints_optimizer_kind(runs, straight):
    """A DP=1 run (non-distributed optimizer) continues at DP=2 and a DP=2 run (distributed)
    at DP=1: unset, the optimizer kind follows the checkpoint, whose state format it is."""
    got = runs["dp2mb4", "from_tp1"]
    assert got["losses"][0] == pytest.approx(straight["tp1"]["losses"][N], rel=1e-6)
    # the DP=2 -> DP=1 direction ran in test_fully_parallel_save_spreads_writes_over_dp


def test_contrary_optimizer_kind_is_one_clear_error(tmp, straight):
    resume = checkpoint.peek(checkpoint.iteration_dir(tmp / "dp2_straight", N))
    common = resume[1]
    assert checkpoint.saved_distributed_optimizer(common) is True
    assert checkpoint.optimizer_kind(None, dp=1, resume=resume) is True
    with pytest.raises(checkpoint.CheckpointError, match="drop --no-use-distributed-optimizer"):
        checkpoint.optimizer_kind(False, dp=2, resume=resume)
    assert checkpoint.optimizer_kind(False, dp=2, resume=resume, finetune=True) is False
    resume = checkpoint.peek(checkpoint.iteration_dir(tmp / "tp1_straight", N))
    common = resume[1]
    assert checkpoint.saved_distributed_optimizer(common) is False
    with pytest.raises(checkpoint.CheckpointError, match="non-distributed optimizer"):
        checkpoint.optimizer_kind(True, dp=2, resume=resume)
    old = {k: v for k, v in common.items() if k != "distributed_optimizer"}   # older checkpoints
    assert checkpoint.saved_distributed_optimizer(old) is False


def test_async_fully_parallel_save_at_dp2_resumes_exactly(tmp, runs, straight):
    """--async-save with the fully parallel strategy at DP=2: the background save of step N,
    written by both DP ranks, continues the run bit-identically."""
    root = tmp / "dp2_async"
    assert checkpoint.read_tracker(root) == 2 * N and not list(root.glob("*.partial"))
    assert len(_bytes_per_rank(checkpoint.iteration_dir(root, N))) == 2
    got = runs["dp2", "from_async"]
    assert got["losses"] == straight["dp2"]["losses"][N:]
