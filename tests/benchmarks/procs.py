# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Process checks shared by the benchmark-runner tests."""
from __future__ import annotations

import subprocess


def alive(marker: str) -> bool:
    """Whether any process's command line contains ``marker`` (pgrep -f)."""
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0
