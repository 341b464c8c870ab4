# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/bench_query_norm.py --smoke in the Triton interpreter: the fused op matches the
torch path, every timed row is positive, the sweep covers its settings."""
from __future__ import annotations

from tests.benchmarks.smoke import bench_module, main_output
from tests.kernels.test_embedding_bag import run_interpreted


def smoke_output() -> str:
    return main_output("bench_query_norm", ["--smoke", "--rep-ms", "1", "--sweep"])


def test_smoke_run(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    text = run_interpreted("tests.benchmarks.test_bench_query_norm", "smoke_output", timeout=600)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| forward")]
    assert [r[:2] for r in rows] == [["forward", "eager"], ["forward+backward", "eager"]], text
    assert all(float(c) > 0 for r in rows for c in r[2:4]), text
    sweep = [line for line in text.splitlines() if line.startswith("| {")]
    assert len(sweep) == len(bench_module("bench_query_norm").SWEEP), text
    assert all(float(line.split("|")[-2]) > 0 for line in sweep), text
    # output fp32 to rounding; the gradients are bf16 (q's and the params' dtype) on both paths
    errs = [float(x) for x in text.split("(out, dq, dweight, dbias, dgain): ")[1].split("\n")[0].split(", ")]
    assert errs[0] < 1e-5 and max(errs[1:]) < 2e-2, errs
