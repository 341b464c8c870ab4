# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/bench_search.py --smoke in the Triton interpreter: both re-scoring paths choose the
same sets, the fused prologue matches the torch ops, every time is positive."""
from __future__ import annotations

from tests.benchmarks.smoke import bench_module, main_output
from tests.kernels.test_embedding_bag import run_interpreted


def smoke_rows() -> list:
    """Run the smoke benchmark (in the interpreter subprocess) -> its two tables' body rows."""
    # the tile sweep at T = 1: every tile still runs over several rows (2H = 4 per half list)
    text = main_output("bench_search", ["--smoke", "--rep-ms", "1", "--sweep", "1"])
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| kernel") and not line.startswith("| T ")]


def test_smoke_run(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    search, prologue, sweep = [], [], []
    for row in run_interpreted("tests.benchmarks.test_bench_search", "smoke_rows", timeout=600):
        (sweep if not row[0][0].isdigit() else search if len(row) == 9 else prologue).append(row)
    # every tile of the training sweep, and the defaults, choose the fp32 reference's sets
    assert len(sweep) == 1 + sum(map(len, bench_module("bench_search").SWEEP.values())), sweep
    assert all(r[4] == "100.000%" and float(r[2]) > 0 for r in sweep), sweep
    assert [int(r[0]) for r in search] == [1, 5] and [int(r[0]) for r in prologue] == [1, 5]
    assert all(r[6] == "100.00%" and r[8] == "100.00%" for r in search), search
    assert all(float(r[7]) > 0 for r in search)
    assert all(float(c) > 0 for r in search for c in r[1:4])
    assert all(float(r[4]) < 1e-4 and float(r[1]) > 0 and float(r[2]) > 0 for r in prologue), prologue
