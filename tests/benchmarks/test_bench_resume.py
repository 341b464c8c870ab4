# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""bench_resume.py --compare: a straight run against another, or against a killed run and its
resumption, at full precision (the check benchmarks/device/deterministic.sh prints)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_resume  # noqa: E402


def _run(losses, norms=(1.0, 2.0, 3.0, 4.0)):
    return {"losses": list(losses), "grad_norms": list(norms), "value_grad_norms": list(norms)}


def test_compare_reports_identity_or_the_first_step_that_parts():
    straight = _run([4.0, 3.5, 3.25, 3.125])
    killed, resumed = _run([4.0, 3.5], [1.0, 2.0]), _run([3.25, 3.125], [3.0, 4.0])
    assert bench_resume.compare(straight, killed, resumed) == [
        f"{key}: bit-identical over 4 steps" for key in bench_resume.SERIES]
    last_bit = _run([4.0, 3.5, 3.25, 3.1250000000000004])
    assert bench_resume.compare(straight, last_bit)[0] == (
        "losses: 1 of 4 steps differ, the first at step 4 (3.125 vs 3.1250000000000004)")
    assert bench_resume.compare(straight, killed)[0] == "losses: 4 steps against 2"
