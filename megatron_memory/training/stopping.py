# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Stopping a run cleanly: preemption signals and the stop file, agreed by every rank.

SLURM and Kubernetes send SIGTERM before they kill a job; a person presses Ctrl-C; the SLURM
launcher (launch/run.py) touches the stop file (``config.STOP_FILE_ENV``) on SIGUSR1. The
training loop finishes its step, saves and exits 0; ``agreed_stop`` makes every rank stop after
the same step, whichever rank saw the reason.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from megatron_memory.config import STOP_FILE_ENV

_STOP_FILE_CODE = 1000  # above every signal number


def agreed_stop(received: Optional[int], device: torch.device) -> Optional[str]:
    """Why to stop, if any rank received a stop signal or sees the stop file (collective:
    all ranks stop after the same step)."""
    code = received or 0
    stop_file = os.environ.get(STOP_FILE_ENV)
    if not code and stop_file and os.path.exists(stop_file):
        code = _STOP_FILE_CODE
    flag = torch.tensor([code], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag) == _STOP_FILE_CODE:
        return f"stop file {stop_file}"
    return f"received {signal.Signals(int(flag)).name}" if int(flag) else None


class StopSignals:
    """Record SIGTERM (preemption: SLURM, Kubernetes) and SIGINT (Ctrl-C) instead of dying, so
    the loop can finish its step and save; a second Ctrl-C interrupts at once. Main thread only
    (Python's rule for signal handlers); elsewhere it records nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
