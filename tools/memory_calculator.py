# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Predict per-GPU memory of a training run: weights, gradients, optimizer state, the value-table
shard, activations, for every pipeline stage of a TP x PP x DP layout (table split over M ranks).

    python -m megatron_memory.tools.memory_calculator --world-size 4 [--vocab-size 32000] [--gpu-gib 80] -- TRAIN FLAGS
    # choose the layout: every TP x PP x M that fits, best first; the last line is "pick: FLAGS"
    python -m megatron_memory.tools.memory_calculator --world-size 4 --gpu-gib 80 --pick -- TRAIN FLAGS

TRAIN FLAGS are those of ``python -m megatron_memory.train`` (e.g. --preset 8b-memory --tp 2
--pp 2). The estimate itself is ``megatron_memory.training.memory_estimate.estimate``; what it counts:
"""
from __future__ import annotations

import argparse
import sys

from megatron_memory.training import memory_estimate
from megatron_memory.cli import config_from_args
from megatron_memory.training.memory_estimate import (GIB, Layout, StageMemory, estimate,
                                                      largest_table, layouts, smallest_world)
from megatron_memory.errors import InputError, command


def format_table(rows: list[StageMemory], gpu_gib: float) -> str:
    head = (f"{'stage':>5} {'layers':>9} {'memory':>10} {'params/GPU':>12} {'table/GPU':>11} "
            f"{'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total GiB':>9} {'at save':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        span = f"{r.layers[0]}-{r.layers[-1]}" if r.layers else "-"
        flag = ("  OVER" if r.total / GIB > gpu_gib else
                "  OVER AT SAVE" if r.save_peak / GIB > gpu_gib else "")
        lines.append(f"{r.stage:>5} {span:>9} {str(r.memory_layers or '-'):>10} "
                     f"{r.dense_params / 1e9:>11.2f}B {r.table_params / 1e9:>10.2f}B "
                     f"{r.weights / GIB:>8.1f} {r.grads / GIB:>8.1f} {r.optimizer / GIB:>8.1f} "
                     f"{r.activations / GIB:>8.1f} {r.total / GIB:>9.1f} {r.save_peak / GIB:>8.1f}{flag}")
    return "\n".join(lines)


def format_layouts(rows: list[Layout], gpu_gib: float) -> str:
    lines = [f"{'TP':>3} {'PP':>3} {'DP':>3} {'M':>4} {'peak GiB':>9}  fits {gpu_gib:g} GiB"]
    lines += [f"{r.tp:>3} {r.pp:>3} {r.dp:>3} {r.mp:>4} {r.peak / GIB:>9.1f}  {'yes' if r.fits else 'no'}"
              for r in rows]
    return "\n".join(lines)


def pick(cfg, a) -> int:
    """Print every layout (best first) and ``pick: FLAGS`` for the best one that fits; when none
    does, one error saying what would: the largest table these GPUs fit, and how many GPUs
    this table needs."""
    args = (a.vocab_size, a.gpu_gib * GIB, a.headroom)
    rows = layouts(cfg, a.world_size, *args, cuda=not a.fp32)
    print(format_layouts(rows, a.gpu_gib))
    if not rows or not rows[0].fits:
        hints = []
        if rows and cfg.memory.resolved_layers(cfg.model.num_layers):
            best = largest_table(cfg, a.world_size, *args, cuda=not a.fp32)
            if best is not None:
                n, lay = best
                hints.append(f"the largest table that fits is --memory-n-keys {n} ({n * n / 1e6:.1f}M "
                             f"values) with {' '.join(lay.flags())}")
        more = smallest_world(cfg, a.world_size, *args, cuda=not a.fp32) if rows else None
        if more is not None:
            hints.append(f"this table fits {more} GPUs (the table's columns split over "
                         f"--memory-parallel-size ranks)")
        hints.append("or try --recompute-activations or a smaller micro-batch")
        raise InputError(f"no TP x PP x M layout of {a.world_size} GPUs keeps the peak under "
                         f"{1 - a.headroom:.0%} of {a.gpu_gib:g} GiB: " + "; ".join(hints))
    print("pick: " + " ".join(rows[0].flags()))
    return 0


@command
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    # --help shows what is counted: the estimate's own docstring, less its title paragraph.
    model = memory_estimate.__doc__.split("\n\n", 1)[1]
    ap = argparse.ArgumentParser(prog="python -m megatron_memory.tools.memory_calculator",
                                 description=f"{__doc__}\n{model}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, required=True, help="GPUs in the job")
    ap.add_argument("--vocab-size", type=int, default=32000, help="padded vocabulary")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU, to flag overflow")
    ap.add_argument("--fp32", action="store_true",
                    help="plan a CPU run (fp32, torch lookups) instead of GPUs; for fp32 on GPUs "
                         "pass --no-bf16 among the TRAIN FLAGS")
    ap.add_argument("--pick", action="store_true",
                    help="choose the layout: list every TP x PP x M (TP <= 8, sequence "
                         "parallelism with TP > 1, memory-parallel size M a multiple of TP "
                         "dividing TP x DP; the TRAIN FLAGS' own --tp/--pp/--memory-parallel-size "
                         "are ignored), best first, and print 'pick: FLAGS' for the best that fits; "
                         "if none fits, say the largest table that does and the GPUs this one needs")
    ap.add_argument("--headroom", type=float, default=0.1,
                    help="with --pick: share of the card kept free for the CUDA context, NCCL "
                         "buffers and allocator slack (default 0.1)")
    a = ap.parse_args(own)
    for flag, value in (("--world-size", a.world_size), ("--vocab-size", a.vocab_size), ("--gpu-gib", a.gpu_gib)):
        if value <= 0:
            raise InputError(f"{flag} must be > 0, got {value}")
    if not 0 <= a.headroom < 1:
        raise InputError(f"--headroom must be in [0, 1), got {a.headroom}")
    cfg, _ = config_from_args(train_args)
    if a.pick:
        return pick(cfg, a)
    rows = estimate(cfg, a.world_size, a.vocab_size, cuda=not a.fp32)
    print(format_table(rows, a.gpu_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
