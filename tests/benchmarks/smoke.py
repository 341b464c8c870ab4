# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""A benchmark script's module and its printed report, for the smoke tests (which run them in
the Triton interpreter's subprocess). benchmarks/ is not a package: it goes on sys.path here,
when a test asks, not at import."""
from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def bench_module(name: str):
    """benchmarks/<name>.py as a module."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def main_output(name: str, argv: list[str]) -> str:
    """What benchmarks/<name>.py main(argv) prints; it must return 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench_module(name).main(argv) == 0
    return out.getvalue()
