# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The code digest that benchmark headers print beside the (possibly stale) git hash."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import provenance  # noqa: E402


def test_digest_follows_the_code_and_nothing_else(tmp_path):
    for d in provenance.CODE_DIRS:
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    first = provenance.code_digest(tmp_path)
    assert first == provenance.code_digest(ROOT) and len(first) == 12
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("new results")      # not code
    (tmp_path / "kernels" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "kernels" / "__pycache__" / "x.py").write_text("# cache")
    assert provenance.code_digest(tmp_path) == first
    kernel = tmp_path / "kernels" / "segment_plan.py"
    kernel.write_text(kernel.read_text() + "\n# one more line\n")          # code changed
    assert provenance.code_digest(tmp_path) != first
    assert provenance.revision(tmp_path).endswith(f"(code {provenance.code_digest(tmp_path)})")
