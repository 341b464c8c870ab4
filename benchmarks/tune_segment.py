# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Tune the segment backward's launch config on this GPU, then time the whole lookup with it.

    python3 benchmarks/tune_segment.py [--d 4096 --T 8192]
    python3 benchmarks/tune_segment.py --blocks-per-sm 128 512 2048 0   # the segment grid

Sweeps BLOCK_D x BLOCK_P x num_warps of the segment backward (sort and plan included) at one
shape, installs the fastest as ``segment_config`` in-process, and reruns the forward /
forward+backward / +main_grad rows of bench_embedding_bag at that shape with it, beside the
default config's rows. Writes $OUT/tune_segment.md when OUT is set.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_embedding_bag as bench  # noqa: E402
from megatron_memory.kernels import triton_embedding_bag as eb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--compare", nargs="+", metavar="BLOCK_D,BLOCK_P,WARPS",
                    help="skip the sweep: time these configs on uniform and zipf indices")
    ap.add_argument("--blocks-per-sm", nargs="+", type=int, metavar="B",
                    help="skip the sweep: time these SEGMENT_BLOCKS_PER_SM values (0: one "
                         "program per chunk the bound allows) on uniform and zipf indices")
    a = ap.parse_args()
    N, bag = (1 << 20, 128) if not a.smoke else (64, 8)
    if a.smoke:
        from tests.kernels.test_embedding_bag import install_interpreter_shim

        install_interpreter_shim()
        a.d, a.T = 16, 4
    ceiling = bench.copy_gbps(a.rep_ms, 1 << 30 if not a.smoke else 1 << 20)
    if a.compare:
        return compare(a, N, bag, ceiling)
    if a.blocks_per_sm:
        return compare_grids(a, N, bag, ceiling)
    table = bench.sweep(a.d, a.T, N, bag, min(a.rep_ms, 50), ceiling, backward_only=True)
    best_line = next(l for l in table.splitlines() if l.startswith("| seg bwd | BLOCK_D="))
    best = {k: int(v) for k, v in (kv.split("=") for kv in best_line.split("|")[2].split())}
    default = eb.segment_config(a.d, 2)
    rows = bench.bench_shape(a.d, a.T, "uniform", N, bag, a.rep_ms, ceiling)
    eb.segment_config = lambda d, esize: dict(best)
    rows_best = bench.bench_shape(a.d, a.T, "uniform", N, bag, a.rep_ms, ceiling)
    head = ["d", "T", "idx", "pass", "GB", "torch ms", "torch %", "seg ms", "seg %", "atomic ms",
            "atomic %", "torch/seg"]
    text = (bench.env_header(f"Segment backward tuning at d={a.d}, T={a.T}") + table
            + f"\n\nDefault config {default}:\n\n" + bench.md_table(head, rows)
            + f"\n\nBest swept config {best}:\n\n" + bench.md_table(head, rows_best) + "\n")
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tune_segment.md").write_text(text)
    return 0


def compare(a, N: int, bag: int, ceiling: float) -> int:
    """The lookup rows under each given segment config, uniform and zipf-skewed indices."""
    head = ["config", "d", "T", "idx", "pass", "GB", "torch ms", "torch %", "seg ms", "seg %",
            "atomic ms", "atomic %", "torch/seg"]
    rows = []
    for spec in a.compare:
        bd, bp, nw = (int(x) for x in spec.split(","))
        eb.segment_config = lambda d, esize, c=dict(BLOCK_D=bd, BLOCK_P=bp, num_warps=nw): dict(c)
        for dist in ("uniform", "zipf"):
            rows += [[spec] + r for r in bench.bench_shape(a.d, a.T, dist, N, bag, a.rep_ms, ceiling)]
    text = bench.env_header(f"Segment backward configs at d={a.d}, T={a.T}") + "\n" + bench.md_table(head, rows)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tune_segment_compare.md").write_text(text)
    return 0


def compare_grids(a, N: int, bag: int, ceiling: float) -> int:
    """The lookup rows under each SEGMENT_BLOCKS_PER_SM (the segment kernel's programs walk the
    chunks up to the device-side count; 0 launches one program per chunk of the static bound,
    those past the real count doing nothing)."""
    head = ["blocks/SM", "d", "T", "idx", "pass", "GB", "torch ms", "torch %", "seg ms", "seg %",
            "atomic ms", "atomic %", "torch/seg"]
    rows = []
    for per_sm in a.blocks_per_sm:
        eb.SEGMENT_BLOCKS_PER_SM = per_sm or 1 << 40
        for dist in ("uniform", "zipf"):
            rows += [[str(per_sm)] + r
                     for r in bench.bench_shape(a.d, a.T, dist, N, bag, a.rep_ms, ceiling)]
    text = (bench.env_header(f"Segment grid (SEGMENT_BLOCKS_PER_SM) at d={a.d}, T={a.T}") + "\n"
            + bench.md_table(head, rows))
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tune_segment_grid.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
