# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Memory parallelism (``parallel.memory_parallel_size`` M > TP): the value table's columns split
over the TP group and M/TP data-parallel ranks give the M = TP run's losses and grad norms, with
the distributed optimizer and without, at TP=1 x DP=4 (M = 2, 4), TP=2 x DP=2 (M = 4, with and
without sequence parallelism) and PP=2 x DP=2 (M = 2, a table copy per stage); one layer equals
the unsharded layer; a checkpoint saved at M=4 resumes at M=4 bit for bit and at M=2 and M=1
(either optimizer kind), and one saved at M=1 at M=4, with the next steps' losses; the exported
table is the whole table; a bad M is one ConfigError; --print-config shows M.

Three 4-rank launches serve every training (``workers.several`` builds one Trainer after another
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


def _cfg(tp, m, dist_opt=True, pp=1, **changes):
    return workers.tiny_config(tp=tp, pp=pp, steps=STEPS, dp_batch=2 * pp, **{
        "parallel.memory_parallel_size": m, "train.distributed_optimizer": dist_opt,
        "train.global_batch_size": 8, **changes})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory_parallel")
    ck = {"on": str(tmp / "ck_on"), "off": str(tmp / "ck_off"), "m1": str(tmp / "ck_m1")}
    at = lambda kind: f"{ck[kind]}/iter_{SAVED:07d}"  # noqa: E731
    save = {"train.save_interval": SAVED}
    plan = {  # launch: {name: config}; TP=1 x DP=4, TP=2 x DP=2, PP=2 x DP=2
        1: {"m1": _cfg(1, 1, save=ck["m1"], **save),
            "m2": _cfg(1, 2),
            "m4": _cfg(1, 4, save=ck["on"], **save),
            "m4off": _cfg(1, 4, dist_opt=False, save=ck["off"], **save),
            "m4_from_m4": _cfg(1, 4, load=at("on")),
            "m2_from_m4": _cfg(1, 2, load=at("on")),
            "m1_from_m4": _cfg(1, 1, load=at("on")),
            "m1off_from_m4off": _cfg(1, 1, dist_opt=None, load=at("off")),
            "m4_from_m1": _cfg(1, 4, load=at("m1"))},
        2: {"tp2": _cfg(2, 2),
            "tp2m4": _cfg(2, 4),
            "tp2m4sp_off": _cfg(2, 4, dist_opt=False, **{"parallel.sequence_parallel": True})},
        # table copies on both stages; the reference without the distributed optimizer: with it
        # at M = TP the copies' gradients are summed after DP's reduce-scatter, whose shard
        # ranges differ between stages (value-table grad norm off by ~3e-5 relative; open)
        3: {"pp2": _cfg(1, 1, dist_opt=False, pp=2), "pp2m2": _cfg(1, 2, pp=2)},
    }
    out = {}
    for configs in plan.values():
        jobs = [(workers.train, cfg, str(tmp / f"{name}.json")) for name, cfg in configs.items()]
        run_ranks(4, workers.several, jobs, tp=0)
        out.update({name: json.load(open(tmp / f"{name}.json")) for name in configs})
    out["tmp"] = tmp
    return out


def _close(got, ref, steps=slice(None)):
    """Step 1 sees identical weights (fp32 rounding only); later steps differ by reduction order,
    which Adam can amplify for near-zero gradients: test_tp_model's tolerances."""
    for key, first, rest in (("losses", 1e-6, 1e-3), ("grad_norms", 1e-5, 1e-2),
                             ("value_grad_norms", 1e-5, 1e-2)):
        a, b = torch.tensor(got[key]), torch.tensor(ref[key][steps])
        assert len(a) == len(b)
        torch.testing.assert_close(a[0], b[0], rtol=first, atol=0)
        torch.testing.assert_close(a, b, rtol=rest, atol=0)


@pytest.mark.parametrize("name,ref", [("m2", "m1"), ("m4", "m1"), ("m4off", "m1"),
                                      ("tp2m4", "tp2"), ("tp2m4sp_off", "tp2"), ("pp2m2", "pp2")])
def test_training_matches_memory_parallel_size_tp(runs, name, ref):
    _close(runs[name], runs[ref])
    assert runs[ref]["losses"][-1] < runs[ref]["losses"][0]
    assert all(v > 0 for v in runs[name]["value_grad_norms"])  # the table's own norm is counted


def test_resume_at_the_same_memory_parallel_size_is_bit_identical(runs):
    got, ref = runs["m4_from_m4"], runs["m4"]
    for key in ("losses", "grad_norms", "value_grad_norms"):
        assert got[key] == ref[key][SAVED:]


@pytest.mark.parametrize("name,ref", [("m2_from_m4", "m4"), ("m1_from_m4", "m4"),
                                      ("m1off_from_m4off", "m4off"), ("m4_from_m1", "m1")])
def test_checkpoint_saved_at_m4_resumes_at_another_size(runs, name, ref):
    _close(runs[name], runs[ref], slice(SAVED, None))


def test_export_from_m4_holds_the_whole_table(runs, tmp_path):
    """The conversion tool reads the global tensors: the table exported from the M=4 checkpoint
    is the four ranks' column slices side by side."""
    from safetensors.torch import load_file

    from megatron_memory.tools.convert_checkpoint import to_hf

    tmp = runs["tmp"]
    out = to_hf(str(tmp / "ck_on"), str(tmp_path / "hf"))  # its latest step: the last
    table = load_file(str(out / "model.safetensors"))["model.memory_values.weight"]
    slices = [torch.load(tmp / f"m4.json.values{r}") for r in range(4)]
    assert [s["columns"] for s in slices] == [(r * 16, (r + 1) * 16) for r in range(4)]
    torch.testing.assert_close(table.float(), torch.cat([s["weight"] for s in slices], dim=1),
                               rtol=0, atol=0)


def _layer_parity() -> None:
    """TP=2 x DP=2 with M=4 (every rank in one memory group): each rank's output and input
    gradient on its own tokens, its layer gradients (TP partial sums added) and its table slice's
    gradient, the sum over both DP ranks' tokens, equal the unsharded layer's."""
    from megatron.core import parallel_state as ps

    from megatron_memory.config import MemoryConfig
    from megatron_memory.model.parallel import initialize_memory_parallel, reduce_tp_partial_grads
    from tests.conftest import tiny_transformer_config
    from tests.parallel.test_tp_layer import B, D, S, layer_pair

    initialize_memory_parallel(2, 1, 4)
    d = ps.get_data_parallel_rank()
    cfg = tiny_transformer_config(hidden_size=D, tensor_model_parallel_size=2)
    values, layer, ref_values, ref_layer = layer_pair(cfg, MemoryConfig(n_keys=8, heads=2, k=3, k_dim=8))
    rank = ps.get_tensor_model_parallel_rank() + 2 * d
    assert values.memory_parallel == 4 and values.columns == (rank * D // 4, (rank + 1) * D // 4)
    assert values.weight.allreduce is False
    gen = torch.Generator().manual_seed(5)
    xs, gs = [torch.randn(S, B, D, generator=gen) for _ in range(2)], [torch.randn(S, B, D, generator=gen) for _ in range(2)]
    x_in = xs[d].clone().requires_grad_(True)
    out, _ = layer(x_in)
    out.backward(gs[d])
    reduce_tp_partial_grads([layer])

    tol = dict(rtol=1e-5, atol=1e-6)
    for dd in (d, 1 - d):  # this rank's tokens first, then the other DP rank's (table grad only)
        x_ref = xs[dd].clone().requires_grad_(True)
        flat = x_ref.reshape(-1, D)
        ref_out = ref_layer.mix(flat, ref_values.lookup(*ref_layer.select(flat))).view_as(x_ref)
        ref_out.backward(gs[dd])
        if dd == d:
            torch.testing.assert_close(out, ref_out, **tol)
            torch.testing.assert_close(x_in.grad, x_ref.grad, **tol)
            for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters()):
                torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")
    c0, c1 = values.columns
    torch.testing.assert_close(values.weight.grad, ref_values.weight.grad[:, c0:c1], **tol)


def test_layer_matches_unsharded():
    run_ranks(4, _layer_parity, tp=0)


def test_a_bad_memory_parallel_size_is_one_config_error():
    base = ["--num-layers", "4", "--hidden-size", "64", "--memory-layers", "1"]
    cfg = lambda *flags: config_from_args(base + list(flags))[0]  # noqa: E731
    with pytest.raises(ConfigError, match="multiple of parallel.tp=2"):
        cfg("--tp", "2", "--memory-parallel-size", "3").validate(4)
    with pytest.raises(ConfigError, match=r"does not divide tp x DP = 1 x 4 = 4.*1, 2, 4"):
        cfg("--memory-parallel-size", "8").validate(4)
    with pytest.raises(ConfigError, match="v_dim=66 is not divisible by parallel.memory_parallel_size=4"):
        cfg("--memory-v-dim", "66", "--memory-parallel-size", "4").validate(4)
    with pytest.raises(ConfigError, match="needs the distributed optimizer in bf16"):
        resolve(cfg("--memory-parallel-size", "4", "--no-distributed-optimizer"),
                Environment(world_size=4, cuda=True))
    assert resolve(cfg("--tp", "2"), Environment(world_size=4)).parallel.memory_parallel_size == 2
    assert resolve(cfg("--memory-parallel-size", "4"),
                   Environment(world_size=4)).parallel.memory_parallel_size == 4


def test_print_config_shows_the_memory_parallel_split(capsys, monkeypatch):
    from megatron_memory.train import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--preset", "tiny", "--memory-parallel-size", "4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "parallel.memory_parallel_size = 4" in out.splitlines()
    assert "value table split over 4 ranks (memory-parallel size)" in out
    assert f"(value table shard {64 ** 2 * 128 // 4:,})" in out  # N x v / M
    assert main(["--preset", "tiny", "--print-config"]) == 0
    assert "parallel.memory_parallel_size = 1" in capsys.readouterr().out.splitlines()
