# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Each rank's Python host time in training steps (cProfile), for host-bound runs.

    torchrun --standalone --nproc-per-node 2 benchmarks/host_profile.py [TRAIN FLAGS]

Why: at micro-batch 1 a step is host-bound, and run 22's profile showed rank 0 waiting in
NCCL for most of a Memory+ step (715 ms of 1722): one rank's host is behind the other's. The
torch profiler cannot say which Python is slow on which rank. This runs
``python -m megatron_memory.train`` with its flags on every rank, profiles the train steps
from ``HOST_PROFILE_FROM`` (default 4, after the warm-up) with cProfile, and writes
``host_rank<R>.txt`` per rank ($OUT, else the working directory): the step wall times and the
functions by own time and by cumulative time. cProfile slows every Python call; compare ranks
and functions, not absolute times.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_memory import train  # noqa: E402
from megatron_memory.training import trainer as training  # noqa: E402


def main(argv: list[str]) -> int:
    start = int(os.environ.get("HOST_PROFILE_FROM", "4"))
    prof, seen, walls = cProfile.Profile(), [0], []
    step = training.Trainer.train_step

    def profiled(self):
        seen[0] += 1
        on = seen[0] >= start
        t0 = time.perf_counter()
        if on:
            prof.enable()
        try:
            return step(self)
        finally:
            if on:
                prof.disable()
                walls.append(time.perf_counter() - t0)

    training.Trainer.train_step = profiled
    rc = train.main(argv)
    rank = os.environ.get("RANK", "0")
    out = Path(os.environ.get("OUT") or ".") / f"host_rank{rank}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    buf.write(f"rank {rank}: {len(walls)} profiled steps, wall s {[round(w, 3) for w in walls]}\n")
    if walls:
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(45)
    out.write_text(buf.getvalue())
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
