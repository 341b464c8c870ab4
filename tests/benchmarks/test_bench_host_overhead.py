# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""benchmarks/bench_host_overhead.py --smoke in the Triton interpreter (every part runs forward
and backward, host and wall times are positive), its cProfile report, and bench_adamw.py
--smoke on CPU."""
from __future__ import annotations

from tests.benchmarks.smoke import bench_module, main_output
from tests.kernels.test_embedding_bag import run_interpreted


def smoke_output() -> str:
    return main_output("bench_host_overhead", ["--smoke"])


def test_smoke_run(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    text = run_interpreted("tests.benchmarks.test_bench_host_overhead", "smoke_output", timeout=600)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| 8 |")]
    assert [r[1] for r in rows] == ["dense SwiGLU FFN", "Memory+ layer", "query+search"], text
    assert all(float(r[2]) > 0 and float(r[3]) >= float(r[2]) for r in rows), text
    assert all(r[7] == "-" for r in rows), text      # no GPU times on CPU: no verdict


def test_python_profile_ranks_the_functions_that_take_the_time():
    bench = bench_module("bench_host_overhead")

    def busy():
        return sum(i * i for i in range(20000))

    text = bench.python_profile(busy, passes=3, top=5)
    assert "function calls" in text and "<genexpr>" in text


def test_adamw_smoke(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    text = main_output("bench_adamw", ["--smoke", "--rep-ms", "1"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| op")]
    assert [r[0] for r in rows] == ["copy (ceiling)", "torch fused AdamW step",
                                    "gradient norm (_foreach_norm)"], text
    assert all(float(r[1]) > 0 for r in rows), text
