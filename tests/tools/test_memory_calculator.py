# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The memory calculator against real models: parameter counts per GPU at TP x PP, and the
activation formula of a dense layer against the bytes autograd actually saves."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_memory.config import replace
from megatron_memory.configs.presets import get_preset
from megatron_memory.cli import config_from_args
from megatron_memory.training.memory_estimate import GIB, _activations, estimate, layouts
from megatron_memory.tools.memory_calculator import main
from tests.parallel import workers
from tests.parallel.dist_utils import run_ranks


def _count_params(cfg, out_file: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_memory.training.trainer import Trainer

    trainer = Trainer(cfg, log=lambda line: None)
    model = trainer.raw_model
    table = model.memory_values.weight.numel() if model.memory_values is not None else 0
    total = sum(p.numel() for p in model.parameters())
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (ps.get_pipeline_model_parallel_rank(), total - table, table))
    if dist.get_rank() == 0:
        json.dump(counts, open(out_file, "w"))
    trainer.close()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_param_counts_match_built_model(tmp_path, tp, pp):
    cfg = workers.tiny_config(tp=tp, pp=pp, **{"model.num_layers": 4, "memory.layers": [1]})
    run_ranks(tp * pp, _count_params, cfg, str(tmp_path / "c.json"), tp=0)
    counts = json.load(open(tmp_path / "c.json"))
    rows = estimate(cfg, tp * pp, vocab_size=1024)
    for stage, dense, table in counts:
        assert rows[stage].dense_params == dense, (stage, rows[stage].dense_params, dense)
        assert rows[stage].table_params == table
    assert rows[0].table_params == 4096 * 64 // tp and (pp == 1 or rows[1].table_params == 0)


def test_dense_layer_activations_match_saved_tensors(megatron_world):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from tests.conftest import tiny_transformer_config

    cfg = replace(get_preset("tiny"), **{"model.hidden_size": 64, "model.seq_length": 96,
                                         "model.num_layers": 1, "memory.layers": [],
                                         "model.attention": "local"})
    tcfg = tiny_transformer_config(num_layers=1, hidden_size=64, ffn_hidden_size=cfg.model.ffn_size(),
                                   num_attention_heads=4)
    layer = TransformerLayer(tcfg, get_gpt_layer_local_spec(normalization="RMSNorm").submodules)
    x = torch.randn(96, 2, 64, requires_grad=True)
    saved = {}

    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.dtype != torch.bool:  # weights and the shared mask aside
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    mask = torch.triu(torch.ones(96, 96, dtype=torch.bool), 1)[None, None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=mask)
    measured = sum(saved.values())
    predicted = _activations(cfg, [0], set(), mbs=2, tp=1, e=4)
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


def test_cli_flags_layouts_that_do_not_fit(capsys):
    assert main(["--world-size", "4", "--gpu-gib", "60", "--", "--preset", "8b-memory", "--tp", "2",
                 "--pp", "2", "--global-batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "OVER" in out and "[4, 12]" in out and "[20]" in out   # Meta's 4/12/20 over two stages
    assert main(["--world-size", "3", "--", "--tp", "2"]) == 2


def test_pick_prefers_data_parallelism_among_layouts_that_fit(capsys):
    argv = ["--world-size", "4", "--pick", "--", "--preset", "8b-memory", "--micro-batch-size", "4",
            "--global-batch-size", "64", "--tp", "1"]  # the user's --tp is ignored by --pick
    cfg = config_from_args(argv[argv.index("--") + 1:])[0]
    assert main(["--gpu-gib", "141", *argv]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "pick: --tp 2 --pp 1 --sequence-parallel"
    # the pick is the estimate's own: every fitting layout with more DP would be over 90%
    rows = layouts(cfg, 4, 32000, 141 * GIB)
    assert rows[0].peak == max(s.save_peak for s in estimate(
        replace(cfg, **{"parallel.tp": 2, "parallel.sequence_parallel": True}), 4, 32000))
    assert all(not r.fits for r in rows if r.tp * r.pp < 2)
    assert {(r.tp, r.pp) for r in rows} == {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)}
    # an 80 GB card: only TP=4 fits
    assert main(["--gpu-gib", "79.6", *argv]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "pick: --tp 4 --pp 1 --sequence-parallel"


def test_pick_without_a_fit_is_one_error(capsys):
    argv = ["--world-size", "2", "--gpu-gib", "24", "--pick", "--", "--preset", "8b-memory"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no TP x PP x M layout of 2 GPUs" in err[0]
    assert main(["--world-size", "2", "--headroom", "1.5", "--pick", "--", "--preset", "tiny"]) == 2


def test_memory_parallelism_divides_the_table_and_pick_chooses_it(capsys):
    """M splits the table's weights and gradients M ways; with the distributed optimizer its
    state is divided over TP x DP / M replicas (the same bytes per GPU at any M); the gathered
    indices/weights grow with M. --pick chooses M, and a table that fits nowhere is one error
    naming the largest table that fits and the GPUs this one needs (issue 27's case)."""
    flags = ["--preset", "1.3b-memory", "--memory-n-keys", "4096", "--micro-batch-size", "4",
             "--global-batch-size", "512"]
    cfg = config_from_args(flags)[0]
    at = {m: estimate(replace(cfg, **{"parallel.memory_parallel_size": m}), 8, 32000)[0]
          for m in (1, 8)}
    table = 4096 ** 2 * 2048
    assert at[1].table_params == table and at[8].table_params == table // 8
    assert at[1].weights - at[8].weights == (table - table // 8) * 2
    assert at[1].grads - at[8].grads == (table - table // 8) * 4
    assert at[1].optimizer == pytest.approx(at[8].optimizer)
    assert at[8].activations > at[1].activations
    assert main(["--world-size", "8", "--gpu-gib", "80", "--pick", "--", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the largest table that fits is --memory-n-keys" in err[0]
    assert "this table fits 16 GPUs" in err[0]
    assert main(["--world-size", "16", "--gpu-gib", "80", "--pick", "--", *flags]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "pick: --tp 2 --pp 1 --sequence-parallel --memory-parallel-size 16")


def test_save_peak_counts_the_gathered_optimizer_state(capsys):
    """The fully-reshardable save gathers the DP group's optimizer state onto every rank: run 10
    (4 x H200, TP=2, DP=2) held 104.5 GiB while saving against 78.2 GiB in training."""
    cfg = config_from_args(["--preset", "8b-memory", "--micro-batch-size", "4",
                            "--global-batch-size", "64", "--tp", "2", "--sequence-parallel"])[0]
    (dp2,) = estimate(cfg, 4, 32000)
    assert dp2.save_extra == dp2.optimizer and abs(dp2.save_peak / GIB - 104.5) / 104.5 < 0.05
    (dp1,) = estimate(cfg, 2, 32000)          # no data parallelism: nothing is gathered
    assert dp1.save_extra == 0 and dp1.save_peak == dp1.total
    assert main(["--world-size", "4", "--gpu-gib", "80", "--", "--preset", "8b-memory",
                 "--micro-batch-size", "4", "--global-batch-size", "64", "--tp", "2",
                 "--sequence-parallel"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OVER AT SAVE")  # trains in 80, saves not


def test_deferred_table_grad_counts_its_stash():
    """--defer-table-grad keeps every lookup's output gradient, indices and weights of the step
    until the fold (plus the fold's concatenated copy), at most until the record reaches
    --defer-table-grad-gib: on the stages with memory layers only."""
    args = ["--preset", "8b-memory", "--micro-batch-size", "4", "--global-batch-size", "64",
            "--tp", "2", "--pp", "2", "--sequence-parallel"]
    base = estimate(config_from_args(args + ["--no-defer-table-grad"])[0], 4, 32000)
    cfg = config_from_args(args + ["--defer-table-grad", "--defer-table-grad-gib", "4"])[0]
    deferred = estimate(cfg, 4, 32000)
    micro, tokens = 64 // 4, 4 * 2048           # DP = 1: 16 micro-batches of 8192 tokens
    v, bag = cfg.memory.value_dim(cfg.model.hidden_size), cfg.memory.bag_size
    for before, after in zip(base, deferred):
        stash = micro * len(after.memory_layers) * tokens * (2 * v / 2 + 12 * bag)
        assert after.deferred == stash
        assert after.total == before.total - before.activations + max(before.activations + stash,
                                                                       2 * stash)
    assert any(s.memory_layers for s in deferred) and deferred[0].deferred > GIB  # 1.4 GiB here
    assert estimate(cfg, 4, 32000, cuda=False)[0].deferred == 0   # CPU: the reference lookup
    # the default bound, 1 GiB: folds as soon as the record reaches it (a whole lookup over it)
    capped = estimate(config_from_args(args + ["--defer-table-grad"])[0], 4, 32000)
    one = tokens * (2 * v / 2 + 12 * bag)
    assert capped[0].deferred == -(-GIB // one) * one and GIB <= capped[0].deferred < GIB + one
    # on by default where the lookups run in Triton (CUDA), off on CPU
    default = config_from_args(args)[0]
    assert default.train.defer_table_grad is None
    assert estimate(default, 4, 32000) == capped
    assert estimate(default, 4, 32000, cuda=False) == estimate(cfg, 4, 32000, cuda=False)
