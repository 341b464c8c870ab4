# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The value table's optimizer step vs the copy ceiling (one GPU).

    python benchmarks/bench_adamw.py [--rows 1048576] [--dim 2048] [--smoke]

One fp32 parameter of rows x dim (the 8B width's table slice per TP = 2 rank: 2^20 x 2048 =
2.1 B values) with an fp32 gradient: torch's fused AdamW step (28 bytes per value moved:
parameter, gradient and both moments read, parameter and moments written), the gradient norm
Megatron takes before it (torch._foreach_norm, 4 bytes), and a device copy for the ceiling.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedding_bag import bench_ms, emit, env_header, md_table  # noqa: E402

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2**20)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench rep time per measurement")
    ap.add_argument("--smoke", action="store_true", help="a 64 x 32 parameter on CPU (script check)")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rows, args.dim = 64, 32
    elif not torch.cuda.is_available():
        ap.error("needs a GPU (or --smoke)")
    if min(args.rows, args.dim, args.rep_ms) < 1:
        ap.error("--rows, --dim and --rep-ms must be >= 1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.rows * args.dim
    p = torch.randn(n, device=dev)
    p.grad = torch.randn(n, device=dev) * 1e-3
    opt = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.1, fused=True)
    dst = torch.empty_like(p)
    copy = bench_ms(lambda: dst.copy_(p), args.rep_ms)
    ceiling = 8 * n / copy / 1e6
    rows = [["copy (ceiling)", f"{copy:.3f}", f"{ceiling:.0f}", "100%"]]
    ops = (("torch fused AdamW step", opt.step, 28 * n),
           ("gradient norm (_foreach_norm)", lambda: torch._foreach_norm([p.grad]), 4 * n))
    for name, fn, nbytes in ops:
        ms = bench_ms(fn, args.rep_ms)
        gbs = nbytes / ms / 1e6
        rows.append([name, f"{ms:.3f}", f"{gbs:.0f}", f"{gbs / ceiling:.0%}"])
        print("  " + " | ".join(rows[-1]), flush=True)
    text = env_header(f"Table optimizer step, {args.rows} x {args.dim} fp32")
    text += "\n" + md_table(["op", "ms", "GB/s", "of ceiling"], rows)
    emit("bench_adamw", text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
