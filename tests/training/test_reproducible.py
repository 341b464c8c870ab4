# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Same seed, same run (issue 30): two CPU runs with the same seed and layout are bit-identical
over 2 x HALF steps, the second one killed by SIGKILL after its save at HALF and resumed.

Per layout, two launches: the first trains 2 x HALF steps straight, then (same processes, from
scratch) HALF steps that save and die by SIGKILL; the second loads that checkpoint and trains the
other HALF. Every loss and grad norm of the straight run must equal the killed-and-resumed run's
at full float precision (JSON keeps a float's shortest exact repr): a step that depended on
thread timing, on the process or on the resume would differ. The default layout runs 2 threads
(where the lookup's order-dependent gradient showed), the others one per rank; the resumed run
gets another PYTHONHASHSEED, so an order that depends on string hashing would show too.
"""
from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from megatron_memory.checkpointing import checkpoint
from tests.parallel import workers
from tests.parallel.dist_utils import run_ranks

HALF = 20
LAYOUTS = {  # name: (world, tp, pp, micro-batch per DP rank, threads per rank); global batch 8
    "default": (1, 1, 1, 4, 2),
    "tp2": (2, 2, 1, 4, 1),
    "pp2": (2, 1, 2, 4, 1),
    "dp2": (2, 1, 1, 2, 1),
}
SERIES = ("losses", "grad_norms", "value_grad_norms")


def _cfg(name, **train):
    _, tp, pp, mbs, _ = LAYOUTS[name]
    return workers.tiny_config(tp=tp, pp=pp, dp_batch=mbs, steps=2 * HALF, **{
        "train.global_batch_size": 8, "model.seq_length": 32,
        **{f"train.{k}": v for k, v in train.items()}})


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_same_seed_run_killed_and_resumed_is_bit_identical(tmp_path, monkeypatch, name):
    world, threads = LAYOUTS[name][0], LAYOUTS[name][4]
    out = {tag: str(tmp_path / f"{tag}.json") for tag in ("straight", "first", "resumed")}
    save = str(tmp_path / "ckpt")
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        run_ranks(world, workers.train_then_kill_another, _cfg(name), out["straight"],
                  _cfg(name, save=save, exit_interval=HALF), out["first"], tp=0, threads=threads)
    assert checkpoint.read_tracker(save) == HALF
    monkeypatch.setenv("PYTHONHASHSEED", "1")   # the launches above ran with conftest's 0
    run_ranks(world, workers.train, _cfg(name, load=save), out["resumed"], tp=0, threads=threads)
    straight, first, resumed = (json.load(open(out[tag])) for tag in out)
    for key in SERIES:
        assert len(straight[key]) == 2 * HALF, key
        assert first[key] + resumed[key] == straight[key], key     # bit-identical, not close
    assert straight["losses"][-1] < straight["losses"][0] - 1.0    # it trained: no flat series
    # torch's fused AdamW (the default) ran, before and after the load, with a step per parameter
    assert all(straight["fused"]) and all(resumed["fused"]) and resumed["own_steps"]
