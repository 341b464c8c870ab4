# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""One resolved config: ``config.resolve`` derives every default once, and ``--print-config``,
the memory calculator's inputs and the Trainer's config agree with it field by field over a grid
of flag sets (CPU / CUDA, bf16 default / on / off, PP 1 / 2, DP 1 / 2); the derived values follow
the documented rules; the result is frozen and the caller's config untouched."""
from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from megatron_memory.cli import config_from_args
from megatron_memory.config import ConfigError, Environment, QueryNorm, resolve, with_vocab
from tests.parallel.dist_utils import run_ranks

VOCAB = 1024  # --vocab-size: --print-config then needs no tokenizer to show it
BASE = ["--num-layers", "4", "--hidden-size", "64", "--memory-layers", "1", "3",
        "--micro-batch-size", "2", "--vocab-size", str(VOCAB)]
GRID = list(itertools.product((False, True), (None, True, False), (1, 2), (1, 2)))


def _flags(bf16, pp) -> list[str]:
    return BASE + ["--pp", str(pp)] + ({None: [], True: ["--bf16"], False: ["--no-bf16"]}[bf16])


def _fields(cfg) -> dict:
    return {f"{s}.{k}": v for s, sec in dataclasses.asdict(cfg).items() for k, v in sec.items()}


@pytest.mark.parametrize("cuda,bf16,pp,dp", GRID)
def test_derived_values_follow_the_rules(cuda, bf16, pp, dp):
    cfg, _ = config_from_args(_flags(bf16, pp))
    env = Environment(world_size=pp * dp, cuda=cuda)
    if bf16 and not cuda:
        with pytest.raises(ConfigError, match="train.bf16 needs CUDA"):
            resolve(cfg, env)
        return
    r = resolve(cfg, env)
    t = r.train
    assert t.bf16 is (cuda if bf16 is None else bf16)
    assert t.cuda_graph_memory is (cuda and t.bf16 and pp == 1)
    assert t.overlap_comm is cuda and t.defer_table_grad is cuda
    assert t.distributed_optimizer is (dp > 1)
    assert t.global_batch_size == 2 * dp and t.warmup_steps == t.steps // 10
    assert r.memory.layers == [1, 3] and r.memory.v_dim == 64 and r.memory.query_norm is QueryNorm.BATCHNORM
    assert r.model.ffn_hidden_size == 256 and r.model.num_query_groups == r.model.num_attention_heads
    assert r.resolved and not cfg.resolved
    assert cfg.train.bf16 is bf16 and cfg.train.cuda_graph_memory is None  # the input is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train.lr = 1.0


def test_a_resumed_optimizer_kind_wins_and_explicit_choices_stay():
    cfg, _ = config_from_args(BASE + ["--no-overlap-comm", "--cuda-graph-memory"])
    r = resolve(cfg, Environment(world_size=2, cuda=True, resumed_distributed_optimizer=False))
    assert r.train.distributed_optimizer is False and r.train.overlap_comm is False
    assert r.train.cuda_graph_memory is True
    with pytest.raises(ConfigError, match="cuda_graph_memory needs CUDA"):
        resolve(cfg, Environment(world_size=2, cuda=False))


@pytest.mark.parametrize("cuda,bf16,pp,dp", [g for g in GRID if not (g[1] and not g[0])])
def test_print_config_and_calculator_read_the_resolved_config(cuda, bf16, pp, dp, monkeypatch, capsys):
    import torch

    from megatron_memory.tools import memory_calculator
    from megatron_memory.training import memory_estimate
    from megatron_memory.train import main

    flags, world = _flags(bf16, pp), pp * dp
    expected = _fields(with_vocab(resolve(config_from_args(flags)[0], Environment(world, cuda)), VOCAB))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(flags + ["--print-config"]) == 0
    printed = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines()
                   if line.split(" = ")[0] in expected)
    assert printed == {k: repr(v.value if isinstance(v, QueryNorm) else v) for k, v in expected.items()}

    seen = []
    real = memory_estimate.resolve
    monkeypatch.setattr(memory_estimate, "resolve", lambda c, e: seen.append(real(c, e)) or seen[-1])
    args = ["--world-size", str(world), "--vocab-size", str(VOCAB)] + ([] if cuda else ["--fp32"])
    assert memory_calculator.main(args + ["--"] + flags) == 0
    assert len(seen) == 1
    assert {k: v for k, v in _fields(seen[0]).items() if k != "model.vocab_size"} == {
        k: v for k, v in expected.items() if k != "model.vocab_size"}


def _trainer_config(flags: list[str], out_file: str) -> None:
    """Build the Trainer (no step) and write its config; rank 0 writes."""
    import torch.distributed as dist

    from megatron_memory.training.trainer import Trainer

    cfg, _ = config_from_args(flags)
    trainer = Trainer(cfg, log=lambda line: None)
    if dist.get_rank() == 0:
        json.dump(dataclasses.asdict(trainer.cfg), open(out_file, "w"))
    trainer.close()


@pytest.mark.parametrize("pp,dp", [(1, 1), (2, 2)])
def test_trainer_runs_the_resolved_config(pp, dp, tmp_path):
    flags = _flags(None, pp) + ["--tensorboard-dir", "", "--eval-iters", "0"]
    run_ranks(pp * dp, _trainer_config, flags, str(tmp_path / "cfg.json"), tp=0)
    got = json.load(open(tmp_path / "cfg.json"))
    expected = dataclasses.asdict(with_vocab(resolve(config_from_args(flags)[0],
                                                     Environment(pp * dp, cuda=False)), VOCAB))
    assert got == json.loads(json.dumps(expected))
