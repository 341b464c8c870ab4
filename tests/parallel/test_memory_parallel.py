# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Memory parallelism (``parallel.memory_parallel_size`` M > TP): the value table's columns split
over the TP group and M/TP data-parallel ranks give the M = TP run's losses and grad norms, with
the distributed optimizer and without, at TP=1 x DP=4 (M = 2, 4) and TP=2 x DP=2 (M = 4, with and
without sequence parallelism); a checkpoint saved at M=4 resumes at M=4 bit for bit and at M=2 and
M=1 (either optimizer kind) with the next steps' losses; a bad M is one ConfigError.

Two 4-rank launches serve every training (``workers.train_many`` builds one Trainer after another
on the same ranks); they dominate the time of this file.
"""
from __future__ import annotations

import json

import pytest
import torch

from megatron_memory.cli import config_from_args
from megatron_memory.config import ConfigError, Environment, resolve
from tests.parallel import workers
from tests.parallel.dist_utils import run_ranks

STEPS, SAVED = 5, 3


def _cfg(tp, m, dist_opt=True, **changes):
    return workers.tiny_config(tp=tp, steps=STEPS, dp_batch=2, **{
        "parallel.memory_parallel_size": m, "train.distributed_optimizer": dist_opt,
        "train.global_batch_size": 8, **changes})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory_parallel")
    ck = {"on": str(tmp / "ck_on"), "off": str(tmp / "ck_off")}
    at = lambda kind: f"{ck[kind]}/iter_{SAVED:07d}"  # noqa: E731
    save = {"train.save_interval": SAVED}
    plan = {  # name: (tp, config) ; TP=1 x DP=4 first, then TP=2 x DP=2
        1: {"m1": _cfg(1, 1),
            "m2": _cfg(1, 2),
            "m4": _cfg(1, 4, save=ck["on"], **save),
            "m4off": _cfg(1, 4, dist_opt=False, save=ck["off"], **save),
            "m4_from_m4": _cfg(1, 4, load=at("on")),
            "m2_from_m4": _cfg(1, 2, load=at("on")),
            "m1_from_m4": _cfg(1, 1, load=at("on")),
            "m1off_from_m4off": _cfg(1, 1, dist_opt=None, load=at("off"))},
        2: {"tp2": _cfg(2, 2),
            "tp2m4": _cfg(2, 4),
            "tp2m4sp_off": _cfg(2, 4, dist_opt=False, **{"parallel.sequence_parallel": True})},
    }
    out = {}
    for tp, configs in plan.items():
        jobs = [(cfg, str(tmp / f"{name}.json")) for name, cfg in configs.items()]
        run_ranks(4, workers.train_many, jobs, tp=0)
        out.update({name: json.load(open(tmp / f"{name}.json")) for name in configs})
    return out


def _close(got, ref, steps=slice(None)):
    """Step 1 sees identical weights (fp32 rounding only); later steps differ by reduction order,
    which Adam can amplify for near-zero gradients (as in test_tp_model)."""
    for key, first, rest in (("losses", 1e-6, 1e-4), ("grad_norms", 1e-5, 1e-3),
                             ("value_grad_norms", 1e-5, 1e-3)):
        a, b = torch.tensor(got[key]), torch.tensor(ref[key][steps])
        assert len(a) == len(b)
        torch.testing.assert_close(a[0], b[0], rtol=first, atol=0)
        torch.testing.assert_close(a, b, rtol=rest, atol=0)


@pytest.mark.parametrize("name,ref", [("m2", "m1"), ("m4", "m1"), ("m4off", "m1"),
                                      ("tp2m4", "tp2"), ("tp2m4sp_off", "tp2")])
def test_training_matches_memory_parallel_size_tp(runs, name, ref):
    _close(runs[name], runs[ref])
    assert runs[ref]["losses"][-1] < runs[ref]["losses"][0]
    assert all(v > 0 for v in runs[name]["value_grad_norms"])  # the table's own norm is counted


def test_resume_at_the_same_memory_parallel_size_is_bit_identical(runs):
    got, ref = runs["m4_from_m4"], runs["m4"]
    for key in ("losses", "grad_norms", "value_grad_norms"):
        assert got[key] == ref[key][SAVED:]


@pytest.mark.parametrize("name,ref", [("m2_from_m4", "m4"), ("m1_from_m4", "m4"),
                                      ("m1off_from_m4off", "m4off")])
def test_checkpoint_saved_at_m4_resumes_at_another_size(runs, name, ref):
    _close(runs[name], runs[ref], slice(SAVED, None))


def test_a_bad_memory_parallel_size_is_one_config_error():
    base = ["--num-layers", "4", "--hidden-size", "64", "--memory-layers", "1"]
    cfg = lambda *flags: config_from_args(base + list(flags))[0]  # noqa: E731
    with pytest.raises(ConfigError, match="multiple of parallel.tp=2"):
        cfg("--tp", "2", "--memory-parallel-size", "3").validate(4)
    with pytest.raises(ConfigError, match=r"does not divide tp x DP = 1 x 4 = 4.*1, 2, 4"):
        cfg("--memory-parallel-size", "8").validate(4)
    with pytest.raises(ConfigError, match="v_dim=66 is not divisible by parallel.memory_parallel_size=4"):
        cfg("--memory-v-dim", "66", "--memory-parallel-size", "4").validate(4)
    assert resolve(cfg("--tp", "2"), Environment(world_size=4)).parallel.memory_parallel_size == 2
    assert resolve(cfg("--memory-parallel-size", "4"),
                   Environment(world_size=4)).parallel.memory_parallel_size == 4
