# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/bench_decode.py on CPU: the tiny run reports all three models with positive times,
its MoE matches the Memory+ layer's parameters at every base, its static-cache decode step gives
the standalone model's logits, and the grouped MoE equals the per-expert loop."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_decode  # noqa: E402
import decode_models as dm  # noqa: E402


def test_tiny_run_reports_three_models(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert bench_decode.main(["--tiny", "--csv", str(tmp_path / "d.csv")]) == 0
    report = capsys.readouterr().out
    table = report[report.index("| batch |"):].splitlines()
    assert table[0].split("|")[2:5] == [" dense ms ", " Memory+ ms ", " MoE ms "]
    body = [line.split("|")[1:-1] for line in table[2:5]]
    assert [int(r[0]) for r in body] == [1, 2, 4]
    assert all(float(c) > 0 for r in body for c in r[1:4] + r[7:10])  # times and floors
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert {(r["model"], int(r["batch"])) for r in rows} == {(m, b) for m in dm.MODELS for b in (1, 2, 4)}
    assert all(float(r["ms_per_token"]) > 0 and float(r["step_gb"]) > 0 for r in rows)
    assert (tmp_path / "d.png").stat().st_size > 0
    assert bench_decode.main(["--plot", str(tmp_path / "d.csv"), "--png", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("base", ["tiny", "1.3b", "8b"])
def test_moe_matches_memory_layer_parameters(base):
    a = bench_decode.model_args(base, 256)
    experts, f = dm.moe_experts(a)
    with torch.device("meta"):
        moe = dm.MoEFFN(a.hidden_size, f, experts)
    per_expert = 3 * a.hidden_size * f + a.hidden_size
    assert dm.param_count(moe) == experts * per_expert and f == a.intermediate_size // 2
    # E is the nearest count: within half an expert of the Memory+ layer (its table share in).
    assert abs(dm.param_count(moe) - dm.memory_layer_params(a)) <= per_expert / 2


@pytest.mark.parametrize("kind", dm.MODELS)
def test_static_cache_step_gives_standalone_logits(kind):
    a = bench_decode.model_args("tiny", 256)
    model = dm.build(a, kind, torch.device("cpu"), torch.float32, seed=1)
    with torch.no_grad():  # 0.02-std weights barely move the logits; make the layers matter
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    full = model(ids)                                                     # [2, 7, V]
    cache = dm.StaticKVCache(a, 2, 16, torch.device("cpu"), torch.float32)
    pos = torch.zeros((), dtype=torch.int64)
    with torch.no_grad():
        got = [dm.decode_step(model, ids[:, :5], pos, cache)]
        for t in (5, 6):
            pos.fill_(t)
            got.append(dm.decode_step(model, ids[:, t:t + 1], pos, cache))
    torch.testing.assert_close(torch.stack(got, 1), full[:, 4:], rtol=1e-4, atol=1e-4)


def test_grouped_moe_equals_per_expert_loop():
    torch.manual_seed(0)
    moe = dm.MoEFFN(32, 16, 6)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
        for t in (1, 5, 40):  # 1 token: four of six experts get none
            x = torch.randn(2, t, 32)
            grouped = moe(x)
            moe.backend = "loop"
            torch.testing.assert_close(grouped, moe(x), rtol=1e-5, atol=1e-5)
            moe.backend = "grouped"
    assert bench_decode.choose_moe_backend("auto", torch.device("cpu"), torch.float32)[0] == "grouped"


def test_bad_arguments_exit_2(capsys):
    for argv in (["--tiny", "--steps", "0"], ["--tiny", "--batches", "0"], ["--plot", "/nonexistent.csv"],
                 ["--tiny", "--modes", "graph"]):
        with pytest.raises(SystemExit) as err:
            bench_decode.main(argv)
        assert err.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_unfused_memory_path_runs(tmp_path, monkeypatch):
    """--memory-path unfused reroutes this process to the pre-fusion decode path and still runs."""
    from megatron_memory.export import standalone
    from megatron_memory.kernels import decode_search

    for owner, name in ((standalone, "product_key_search"), (standalone, "fused_query_prologue"),
                        (decode_search, "MAX_TOKENS")):
        monkeypatch.setattr(owner, name, getattr(owner, name))   # restored after the test
    monkeypatch.delenv("OUT", raising=False)
    assert bench_decode.main(["--tiny", "--memory-path", "unfused", "--batches", "1",
                              "--csv", str(tmp_path / "d.csv")]) == 0
    assert standalone.fused_query_prologue is None
    assert standalone.product_key_search.__name__ == "<lambda>"  # the loop re-scoring wrapper
    assert decode_search.MAX_TOKENS == 0
