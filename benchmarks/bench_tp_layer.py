# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""One Memory+ layer forward+backward, TP=1 vs TP=2 (value table split along its width), on 2 GPUs.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_tp_layer.py [--append]

T tokens per rank (sequence parallel layout), d = v = 4096, N = 2**20, heads 4 x top-32, bf16,
the table's gradient accumulated into an fp32 main_grad (the training path). TP=1: each GPU runs
the whole layer on its own T tokens (the table replicated). TP=2: the table split in two column
halves, indices/weights all-gathered, results returned by all-to-all. The communication share
is the time of the same collectives on tensors of the same sizes, run alone, over the TP=2 time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from provenance import revision  # benchmarks/ is on sys.path: the script runs from it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"  # CPU (gloo) only to smoke-test this script before a GPU run


def sync():
    if CUDA:
        torch.cuda.synchronize()


def bench(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median ms over ``iters`` runs (CUDA events), after ``warmup`` runs; barrier-aligned."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def build_layer(tp: int, d: int, n_keys: int):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from megatron_memory.config import MemoryConfig
    from megatron_memory.model.layer import MemoryPlus
    from megatron_memory.model.gpt import build_values

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    cfg = TransformerConfig(num_layers=1, hidden_size=d, num_attention_heads=32,
                            tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                            params_dtype=torch.bfloat16 if CUDA else torch.float32, bf16=CUDA,
                            use_cpu_initialization=not CUDA)
    mc = MemoryConfig(n_keys=n_keys, heads=4, k=32, k_dim=512)
    values = build_values(cfg, mc)
    values.weight.main_grad = torch.zeros(values.weight.shape, dtype=torch.float32, device=DEV)
    layer = MemoryPlus(cfg, mc, values, layer_id=0).to(DEV)
    return layer, values, mc


def run_layer(layer, x, g):
    def step():
        out, _ = layer(x)
        out.backward(g)
    return step


def comm_only(tokens: int, bag: int, v: int, tp: int):
    """The layer's collectives alone, same sizes: gather idx+w, a2a fwd, reduce-scatter, a2a bwd."""
    from megatron.core.tensor_parallel.mappings import all_to_all_hp2sp, all_to_all_sp2hp

    group = None
    dt = torch.bfloat16 if CUDA else torch.float32
    idx = torch.randint(0, 1 << 20, (tokens, bag), device=DEV)
    w = torch.rand(tokens, bag, device=DEV)
    cols = torch.randn(tokens * tp, v // tp, device=DEV, dtype=dt)
    rows = torch.randn(tokens, v, device=DEV, dtype=dt)
    gw = torch.rand(tokens * tp, bag, device=DEV)

    def step():
        out_i = torch.empty(tokens * tp, bag, dtype=idx.dtype, device=DEV)
        dist.all_gather_into_tensor(out_i, idx, group=group)
        out_w = torch.empty(tokens * tp, bag, device=DEV)
        dist.all_gather_into_tensor(out_w, w, group=group)
        all_to_all_hp2sp(cols)
        red = torch.empty(tokens, bag, device=DEV)
        dist.reduce_scatter_tensor(red, gw, group=group)
        all_to_all_sp2hp(rows)
    return step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--n-keys", type=int, default=1024)
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = ap.parse_args()
    if CUDA:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from megatron_memory.training.cpu import cpu_shims

        cpu_shims().__enter__()  # for the whole benchmark process: it runs Megatron-Core directly
    dist.init_process_group("nccl" if CUDA else "gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x = torch.randn(a.tokens, 1, a.dim, device=DEV, dtype=torch.bfloat16 if CUDA else torch.float32,
                    requires_grad=True)
    g = torch.randn_like(x)
    rows = {}
    for tp in (1, 2):
        layer, values, mc = build_layer(tp, a.dim, a.n_keys)
        rows[tp] = bench(run_layer(layer, x, g))
        del layer, values
        if CUDA:
            torch.cuda.empty_cache()
    comm = bench(comm_only(a.tokens, 128, a.dim, 2))
    if rank == 0:
        name = torch.cuda.get_device_name() if CUDA else "CPU (smoke test)"
        table = "\n".join([
            f"### Memory+ layer, TP=1 vs TP=2 — {name} x2, {datetime.date.today()}, {revision()}",
            "",
            f"d={a.dim}, N={a.n_keys**2}, heads 4 x k 32, bf16, {a.tokens} tokens per rank, "
            "fwd+bwd with fp32 main_grad accumulation (median of 10)",
            "",
            "| layout | ms fwd+bwd | comm ms (alone) | comm share |",
            "|---|---|---|---|",
            f"| TP=1 (table replicated) | {rows[1]:.2f} | 0 | 0% |",
            f"| TP=2 (table split, SP) | {rows[2]:.2f} | {comm:.2f} | {comm / rows[2]:.0%} |",
            ""])
        print(table)
        if a.append:
            with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
                f.write(table + "\n")
        out = os.environ.get("OUT")
        if out:
            Path(out, "bench_tp_layer.md").write_text(table)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
