# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The value table's gradient over one training step, per-lookup passes vs the deferred fold.

    python benchmarks/bench_table_grad.py [--lookups 24] [--dist uniform zipf] [--sweep] [--smoke]

The shape of one TP = 2 rank at the 8B width (benchmarks/RESULTS.md run 20): a 2^20 x 2048 bf16
table slice, fp32 main_grad, lookups of T = 8192 tokens x bag 128; 24 lookups = 3 memory layers
x 8 micro-batches. Both modes produce the weight gradients of every lookup and the step's table
gradient:
- per-lookup: one segment pass per lookup (weight gradients fused, main_grad read-modify-write);
- deferred: one token kernel per lookup (weight gradients), then one fold of everything
  (``launch_fold``), and for reference run 18's fold (wide column blocks, gathers from HBM).
Bytes moved (from HBM or L2): every occurrence's gradient row (bf16), the touched fp32 rows
read and written, and per-lookup the touched table rows (for the fused weight gradients), in the
fold the sorted plan (token + weight, 8 bytes an occurrence) once per column block; % of the copy
ceiling can pass 100% where L2 serves the gathers. ``--sweep`` times other fold tiles. ``--smoke`` runs tiny shapes on CPU (TRITON_INTERPRET=1) to check the script.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from bench_embedding_bag import bench_ms, copy_gbps, device, emit, env_header, free_memory, make_indices, md_table  # noqa: E402
from megatron_memory.kernels import triton_embedding_bag as eb  # noqa: E402

# Around run 21's best (128 columns, 8 occurrences, 1 warp; narrower blocks and more warps lost).
SWEEP_TILES = [(64, 16, 1), (128, 4, 1), (128, 8, 1), (128, 16, 1), (128, 32, 1), (256, 4, 1),
               (256, 8, 1), (256, 8, 2), (256, 16, 2), (512, 4, 2), (512, 8, 2), (512, 8, 4)]
SWEEP_PROGRAMS_PER_SM = (4, 8, 32, 64, 128)


def make_lookups(n: int, N: int, T: int, bag: int, d: int, dist: str):
    """n lookups' (grad_out [T, d] bf16, indices [T, bag] int64, weights [T, bag] fp32)."""
    gen = torch.Generator(device=device()).manual_seed(1)
    out = []
    for i in range(n):
        g = torch.randn(T, d, generator=gen, device=device()).to(torch.bfloat16)
        w = torch.softmax(torch.randn(T, bag, generator=gen, device=device()), -1)
        out.append((g, make_indices(dist, T, bag, N, seed=100 + i), w))
    return out


def unique_rows(lookups, N: int) -> int:
    seen = torch.zeros(N, dtype=torch.bool, device=device())
    for _, idx, _ in lookups:
        seen[idx.flatten()] = True
    return int(seen.sum())


def measure(N, d, T, bag, n, dist, rep_ms, ceiling, sweep):
    """-> (table rows, sweep rows) for one index distribution."""
    V = torch.randn(N, d, device=device()).to(torch.bfloat16)
    lookups = make_lookups(n, N, T, bag, d, dist)
    grads = torch.cat([g for g, _, _ in lookups])
    indices = torch.cat([i for _, i, _ in lookups])
    weights = torch.cat([w for _, _, w in lookups])
    per, fold = torch.zeros(N, d, device=device()), torch.zeros(N, d, device=device())

    def per_lookup():
        for g, idx, w in lookups:
            eb.launch_segment_backward(g, V, idx, w, per, True)

    def tokens():
        for g, idx, w in lookups:
            eb.launch_token_backward(g, V, idx, w, None, True)

    def folded(cfg=None, programs=None):
        return lambda: eb.launch_fold(grads, indices, weights, fold, config=cfg, programs=programs)

    wide = lambda: eb.launch_segment_backward(grads, V, indices, weights, fold, False)  # noqa: E731
    per_lookup()
    folded()()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    err = ((per - fold).norm() / per.norm()).item()
    U, U1 = unique_rows(lookups, N), unique_rows(lookups[:1], N)
    cfg = eb.fold_config(d)
    plan = triton.cdiv(d, cfg["BLOCK_D"]) * T * bag * n * 8
    gathers = n * T * bag * d * 2
    fold_bytes = U * d * 8 + gathers + plan
    per_bytes = n * U1 * d * 10 + gathers
    ms = {k: bench_ms(f, rep_ms) for k, f in
          [("per", per_lookup), ("tokens", tokens), ("fold", folded()), ("wide", wide)]}
    pct = lambda b, t: f"{b / t / 1e6 / ceiling * 100:.0f}%"  # noqa: E731
    rows = [[dist, "per-lookup segment passes (weight grads fused)", f"{ms['per']:.2f}",
             f"{per_bytes / 1e9:.1f}", pct(per_bytes, ms["per"]), "1.00x"],
            [dist, "deferred: token kernels (weight grads)", f"{ms['tokens']:.2f}", "", "", ""],
            [dist, f"deferred: fold {cfg}", f"{ms['fold']:.2f}", f"{fold_bytes / 1e9:.1f}",
             pct(fold_bytes, ms["fold"]), ""],
            [dist, "deferred: token kernels + fold", f"{ms['tokens'] + ms['fold']:.2f}", "", "",
             f"{ms['per'] / (ms['tokens'] + ms['fold']):.2f}x"],
            [dist, "run 18's fold (wide blocks)", f"{ms['wide']:.2f}", "", "",
             f"{ms['wide'] / ms['fold']:.2f}x the fold's time"]]
    notes = (f"{dist}: {U:,} rows touched in the step ({U / N:.0%}), {U1:,} by one lookup; "
             f"fold vs per-lookup main_grad: relative difference {err:.1e}\n")
    sweep_rows = []
    if sweep:
        for bd, bp, w in SWEEP_TILES:
            t = bench_ms(folded(dict(BLOCK_D=bd, BLOCK_P=bp, num_warps=w)), rep_ms)
            sweep_rows.append([dist, bd, bp, w, "default", f"{t:.2f}", f"{ms['fold'] / t:.2f}x"])
        sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1
        for per_sm in SWEEP_PROGRAMS_PER_SM:
            t = bench_ms(folded(programs=sms * per_sm), rep_ms)
            sweep_rows.append([dist, cfg["BLOCK_D"], cfg["BLOCK_P"], cfg["num_warps"],
                               f"{per_sm}/SM", f"{t:.2f}", f"{ms['fold'] / t:.2f}x"])
    del V, lookups, grads, indices, weights, per, fold
    free_memory()
    return rows, sweep_rows, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lookups", type=int, default=24, help="lookups per step (layers x micro-batches)")
    ap.add_argument("--dist", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"])
    ap.add_argument("--sweep", action="store_true", help="also time other fold tiles and grids")
    ap.add_argument("--rep-ms", type=int, default=300, help="do_bench rep time per measurement")
    ap.add_argument("--append", action="store_true", help="append to benchmarks/RESULTS.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check)")
    args = ap.parse_args(argv)
    if args.smoke:
        from tests.kernels.test_embedding_bag import install_interpreter_shim

        install_interpreter_shim()  # numpy >= 2.5 vs Triton 3.6's interpreter
        N, d, T, bag, n = 64, 40, 6, 4, 3
    else:
        N, d, T, bag, n = 1 << 20, 2048, 8192, 128, args.lookups
    ceiling = copy_gbps(args.rep_ms, 1 << 30 if not args.smoke else 1 << 16)
    rows, sweep_rows, notes = [], [], ""
    for dist in args.dist:
        r, s, t = measure(N, d, T, bag, n, dist, args.rep_ms, ceiling, args.sweep)
        rows, sweep_rows, notes = rows + r, sweep_rows + s, notes + t
    text = env_header(f"Table gradient of one step: {n} lookups of T={T} x bag {bag} into "
                      f"[{N}, {d}] bf16, fp32 main_grad")
    text += f"\nCopy ceiling {ceiling:.0f} GB/s (read + write).\n{notes}\n"
    text += md_table(["idx", "what", "ms", "GB", "% of copy", "vs per-lookup"], rows)
    if sweep_rows:
        text += "\n" + md_table(["idx", "BLOCK_D", "BLOCK_P", "warps", "programs", "fold ms",
                                 "vs default"], sweep_rows)
    emit("bench_table_grad", text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
