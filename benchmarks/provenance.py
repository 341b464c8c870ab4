# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Which code a benchmark ran: ``revision()`` -> "git abc1234 (code 0123456789ab)".

The device machine runs a copy of the working tree whose .git can be older than the code, so
``git rev-parse`` there can name the wrong commit (benchmarks/RESULTS.md runs 8-16 say which
tree ran by hand). ``code_digest`` hashes the code itself; run it on a checkout of a commit
(``python benchmarks/provenance.py``) to tell whether that commit's code is what ran.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("megatron_memory", "kernels", "configs", "tools", "benchmarks", "launch")


def code_digest(root: Path = ROOT) -> str:
    """SHA-256 (12 hex digits) of the .py files under CODE_DIRS, by relative path and content."""
    h = hashlib.sha256()
    for path in sorted(p for d in CODE_DIRS for p in (root / d).rglob("*.py")
                       if "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def revision(root: Path = ROOT) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return f"git {sha} (code {code_digest(root)})"


if __name__ == "__main__":
    print(revision())
    sys.exit(0)
