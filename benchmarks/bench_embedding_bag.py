# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""EmbeddingBag on one GPU: torch vs the Triton op (both backward strategies), as % of copy.

    python benchmarks/bench_embedding_bag.py [--append] [--sweep | --sweep-only] [--rep-ms 100] [--smoke]

Three passes per shape: forward; forward+backward with the table gradient into an existing
bf16 .grad; forward+backward+accumulation into a pre-allocated fp32 main_grad (ours directly,
torch = its dense backward + main_grad.add_(grad)). Bytes are the minimal counts of
benchmarks/README.md; GB/s = bytes / median time, % = of a device-to-device copy's GB/s.
``--smoke`` runs tiny shapes on CPU (TRITON_INTERPRET=1) to check the script itself.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_memory.kernels import triton_embedding_bag as eb
from provenance import revision  # noqa: E402 (benchmarks/ is on sys.path: scripts run from it)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
N_SETS = 3  # index sets rotated between calls so L2 never holds the previous call's rows


# ---------------------------------------------------------------- shared helpers (also used by
# bench_memory_layer.py)

def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_ms(fn, rep_ms: int = 100, grad_to_none=None) -> float:
    """Median ms of fn(): triton.testing.do_bench on GPU (flushes L2 between calls); one
    wall-clock run on CPU (smoke mode only: it checks that every path runs, in the Triton
    interpreter, where each call is slow and its time means nothing)."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms,
                                       grad_to_none=grad_to_none, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def env_header(title: str) -> str:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke)"
    return (f"## {title}\n\n{gpu}; {datetime.datetime.now():%Y-%m-%d %H:%M}; {revision()}; "
            f"torch {torch.__version__}; triton {triton.__version__}\n")


def emit(name: str, text: str, append: bool) -> None:
    """Print; with --append add to benchmarks/RESULTS.md; with $OUT set write $OUT/<name>.md."""
    print(text, flush=True)
    if append:
        with open(RESULTS, "a") as f:
            f.write(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.md").write_text(text)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def graph_replay(fn, warmup: int = 3):
    """fn captured in a CUDA graph after ``warmup`` calls on a side stream (torch's capture
    needs them there) -> a closure replaying it: fn's GPU time without the host's launches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_gbps(rep_ms: int, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth: (read + written bytes) / median time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms)
    del src, dst
    free_memory()
    return 2 * nbytes / ms / 1e6


# ---------------------------------------------------------------- inputs and byte counts

def make_indices(dist: str, T: int, bag: int, N: int, seed: int) -> torch.Tensor:
    """uniform, or zipf: log-uniform ranks (P(rank r) ~ 1/r, s = 1) on a random row permutation."""
    gen = torch.Generator(device=device()).manual_seed(seed)
    if dist == "uniform":
        return torch.randint(0, N, (T, bag), generator=gen, device=device())
    u = torch.rand(T, bag, generator=gen, device=device(), dtype=torch.float64)
    ranks = (torch.exp(u * torch.log(torch.tensor(float(N)))) - 1).long().clamp_(0, N - 1)
    return torch.randperm(N, generator=gen, device=device())[ranks]


def byte_counts(T: int, bag: int, d: int, U: float, e: int = 2) -> dict:
    """Minimal bytes (README): gathered rows, out/grad rows, index+weight traffic, table-grad RMW."""
    small = T * bag * (8 + 4)                       # int64 index + fp32 weight per entry
    fwd = T * bag * d * e + T * d * e + small
    bwd = U * d * e + T * bag * d * e + T * bag * (8 + 4 + 4)   # V rows once, g rows, + grad_w
    return dict(fwd=fwd, grad=fwd + bwd + U * d * 2 * e, main=fwd + bwd + U * d * 8)


# ---------------------------------------------------------------- one shape

def bench_shape(d: int, T: int, dist: str, N: int, bag: int, rep_ms: int, ceiling: float):
    dev = device()
    table = torch.nn.Parameter(torch.randn(N, d, device=dev, dtype=torch.bfloat16) * 0.02)
    sets = [make_indices(dist, T, bag, N, seed) for seed in range(N_SETS)]
    weights = [torch.rand(T, bag, device=dev).requires_grad_() for _ in range(N_SETS)]
    psw = [w.detach().bfloat16() for w in weights]  # torch needs psw in the table's dtype
    g = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    U = sum(torch.unique(s).numel() for s in sets) / N_SETS
    nbytes = byte_counts(T, bag, d, U)
    turn = [0]

    def nxt():
        turn[0] += 1
        return turn[0] % N_SETS

    def ours(det, backward):
        def run():
            i = nxt()
            with torch.set_grad_enabled(backward):
                out = eb.triton_embedding_bag(table, sets[i], weights[i], deterministic=det)
            if backward:
                out.backward(g)
        return run

    def torch_op(backward, fold):
        def run():
            i = nxt()
            with torch.set_grad_enabled(backward):
                out = F.embedding_bag(sets[i], table, per_sample_weights=psw[i], mode="sum")
            if backward:
                out.backward(g)
            if fold:
                table.main_grad.add_(table.grad)
                table.grad = None
        return run

    def timed(fn):
        try:
            return bench_ms(fn, rep_ms, grad_to_none=weights)
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # torch may lack a dtype combo
            print(f"  n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
            return None

    res = {}
    table.main_grad = None
    res["fwd"] = (timed(torch_op(False, False)), timed(ours(True, False)), None)
    table.grad = torch.zeros_like(table)
    res["grad"] = (timed(torch_op(True, False)), timed(ours(True, True)), None)
    table.grad = None
    table.main_grad = torch.zeros(N, d, device=dev)
    res["main"] = (timed(torch_op(True, True)), timed(ours(True, True)), timed(ours(False, True)))
    rows = []
    names = {"fwd": "fwd", "grad": "fwd+bwd .grad", "main": "fwd+bwd main_grad"}
    for key, (t_torch, t_seg, t_atom) in res.items():
        gb = nbytes[key] / 1e9

        def pct(ms):
            return "n/a" if ms is None else f"{gb / ms * 1e3 / ceiling * 100:.0f}%"

        def fmt(ms):
            return "n/a" if ms is None else f"{ms:.3f}"

        rows.append([d, T, dist, names[key], f"{gb:.2f}", fmt(t_torch), pct(t_torch), fmt(t_seg),
                     pct(t_seg), fmt(t_atom) if key == "main" else "-",
                     pct(t_atom) if key == "main" else "-",
                     f"{t_torch / t_seg:.2f}x" if t_torch and t_seg else "n/a"])
        print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)
    del table, sets, weights, psw, g
    free_memory()
    return rows


# ---------------------------------------------------------------- launch-config sweep

def sweep(d: int, T: int, N: int, bag: int, rep_ms: int, ceiling: float,
          backward_only: bool = False) -> str:
    """Forward and segment-backward tile choices at one shape (ms, % of copy): data for
    gather_config / segment_config in kernels/triton_embedding_bag.py. Rows print as measured."""
    dev = device()
    V = torch.randn(N, d, device=dev, dtype=torch.bfloat16)
    sets = [make_indices("uniform", T, bag, N, s) for s in range(N_SETS)]
    w = torch.rand(T, bag, device=dev)
    g = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    buf = torch.zeros(N, d, device=dev)
    U = sum(torch.unique(s).numel() for s in sets) / N_SETS
    nb = byte_counts(T, bag, d, U)
    bwd_bytes = nb["main"] - nb["fwd"]
    turn = [0]
    rows = []

    def measure(kind, cfg, fn, nbytes):
        def run():
            turn[0] += 1
            fn(sets[turn[0] % N_SETS], cfg)
        ms = bench_ms(run, rep_ms)
        rows.append([kind, " ".join(f"{k}={v}" for k, v in cfg.items()), f"{ms:.3f}",
                     f"{nbytes / ms / 1e6 / ceiling * 100:.0f}%"])
        print("  sweep " + " | ".join(rows[-1]), flush=True)

    blocks = (512, 1024, 2048) if d >= 512 else (16, 32)
    for bd in () if backward_only else blocks:
        for bb in (4, 8, 16):
            for nw in (4, 8):
                measure("fwd", dict(BLOCK_D=bd, BAG_BLOCK=bb, num_warps=nw),
                        lambda idx, cfg: eb.launch_forward(V, idx, w, config=cfg), nb["fwd"])
    for bd in blocks:
        for bp in (1, 2, 4) if backward_only else (2, 4, 8):
            for nw in (2, 4, 8) if backward_only else (4, 8):
                measure("seg bwd", dict(BLOCK_D=bd, BLOCK_P=bp, num_warps=nw),
                        lambda idx, cfg: eb.launch_segment_backward(g, V, idx, w, buf, True, config=cfg),
                        bwd_bytes)
    rows.sort(key=lambda r: (r[0], float(r[2])))
    best = [r for r in rows if r[0] == "fwd"][:5] + [r for r in rows if r[0] == "seg bwd"][:5]
    default = [["fwd (default)", str(eb.gather_config(d, 2, bag)), "", ""],
               ["seg bwd (default)", str(eb.segment_config(d, 2)), "", ""]]
    del V, sets, w, g, buf
    free_memory()
    return (f"\nConfig sweep at d={d}, T={T}, bag={bag}, N={N} (5 fastest of each; main_grad "
            f"backward bytes for seg bwd):\n\n"
            + md_table(["kernel", "config", "ms", "% copy"], best + default))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configs at d=4096")
    ap.add_argument("--sweep-only", action="store_true", help="only the launch-config sweep")
    ap.add_argument("--sweep-backward", action="store_true",
                    help="only a wider sweep of the segment backward (BLOCK_P 1-4, 2-8 warps)")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench rep time per measurement")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check)")
    args = ap.parse_args()
    if args.smoke:
        from tests.kernels.test_embedding_bag import install_interpreter_shim

        install_interpreter_shim()  # numpy >= 2.5 vs Triton 3.6's interpreter
    torch.manual_seed(0)
    if args.smoke:
        N, bag, shapes, zipf = 64, 8, [(16, 4)], (16, 4)
    else:
        N, bag = 1 << 20, 128
        shapes, zipf = [(d, T) for d in (1024, 2048, 4096) for T in (8192, 32768)], (4096, 8192)
    ceiling = copy_gbps(args.rep_ms, 1 << 30 if not args.smoke else 1 << 20)
    print(f"copy ceiling {ceiling:.0f} GB/s", flush=True)
    sweep_shape = (16, 4) if args.smoke else (4096, 8192)
    if args.sweep_only or args.sweep_backward:
        text = env_header("EmbeddingBag launch-config sweep (bf16 table)")
        text += sweep(*sweep_shape, N, bag, min(args.rep_ms, 50), ceiling, args.sweep_backward)
        emit("bench_embedding_bag_sweep", text, args.append)
        return 0
    rows = []
    for d, T in shapes:
        rows += bench_shape(d, T, "uniform", N, bag, args.rep_ms, ceiling)
    rows += bench_shape(*zipf, "zipf", N, bag, args.rep_ms, ceiling)
    text = env_header(f"EmbeddingBag (N={N}, bag={bag}, bf16 table, fp32 weights)")
    text += (f"\nCopy ceiling (device-to-device, read+write): {ceiling:.0f} GB/s. "
             f"seg = segment strategy (deterministic), atomic = fp32 atomics (main_grad only). "
             f"torch: F.embedding_bag(mode='sum', per_sample_weights bf16, no weight grad; bf16 "
             f"psw grads are unsupported), dense table grad; ours also computes the weight grads. "
             f"Default strategy: {eb.DEFAULT_STRATEGY}.\n\n")
    text += md_table(["d", "T", "idx", "pass", "GB", "torch ms", "torch %", "seg ms", "seg %",
                      "atomic ms", "atomic %", "torch/seg"], rows)
    if args.sweep:
        text += sweep(*sweep_shape, N, bag, min(args.rep_ms, 50), ceiling)
    emit("bench_embedding_bag", text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
