# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/bench_table_grad.py --smoke in the Triton interpreter: the fold and the per-lookup
passes agree, every timed row is positive, the sweep covers its tiles."""
from __future__ import annotations

from tests.benchmarks.smoke import bench_module, main_output
from tests.kernels.test_embedding_bag import run_interpreted


def smoke_output() -> str:
    return main_output("bench_table_grad", ["--smoke", "--rep-ms", "1", "--sweep", "--dist", "uniform"])


def test_smoke_run(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    text = run_interpreted("tests.benchmarks.test_bench_table_grad", "smoke_output", timeout=900)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| uniform")]
    bench = bench_module("bench_table_grad")
    assert len(rows) == 5 + len(bench.SWEEP_TILES) + len(bench.SWEEP_PROGRAMS_PER_SM), text
    assert all(float(r[2] if len(r) == 6 else r[5]) > 0 for r in rows), text
    diff = float(text.split("relative difference ")[1].split()[0])
    assert diff < 1e-6, text
