# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Host time vs GPU time of a Memory+ layer, its query+search, and a dense SwiGLU FFN (one GPU).

    python benchmarks/bench_host_overhead.py [--tokens 2048 8192] [--width 4096] [--cprofile]

Why: at micro-batch 1 x 2048 a training step is host-bound (run 20: the dense step kept the GPU
busy 24% of its time), so a memory layer costs what its Python and kernel launches cost, not what
its kernels take. Per forward+backward pass this reports: host ms (the time to enqueue it, no
sync inside), wall ms (enqueue + drain), GPU kernel ms (sum of kernel durations, torch profiler),
busy ms (their union) and kernels launched. A part is host-bound where host ms > busy ms.
The layer's table gradient takes the training default on CUDA: the deferred record, folded after
every pass. ``--cprofile`` adds the Python functions that take the host time of the Memory+ layer
at the first token count (cProfile inflates every call; read it as a ranking). ``--top`` lists
the largest kernels of query+search at the last token count.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedding_bag import device, emit, env_header, md_table  # noqa: E402
from bench_memory_layer import SwiGLU, build, ffn_width, fwd_bwd  # noqa: E402

import torch  # noqa: E402

from megatron_memory import kernels  # noqa: E402
from megatron_memory.training import step_profile  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn, passes: int) -> dict:
    """Per pass: host (enqueue) ms, wall ms, kernel ms, busy ms, kernel launches; and the
    kernels' (name, start, end) of the profiled passes."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(passes):
        fn()
    host = time.perf_counter() - t0
    sync()
    wall = time.perf_counter() - t0
    out = {"host": host * 1e3 / passes, "wall": wall * 1e3 / passes}
    if not torch.cuda.is_available():
        return out | {"gpu": float("nan"), "busy": float("nan"), "launches": 0, "kernels": []}
    from torch.profiler import ProfilerActivity, profile  # the profiler only when a GPU is timed

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            fn()
        sync()
    ks = step_profile.device_kernels(prof)
    return out | {"gpu": sum(e - s for _, s, e in ks) / 1e3 / passes,
                  "busy": step_profile.busy_us((s, e) for _, s, e in ks) / 1e3 / passes,
                  "launches": len(ks) / passes, "kernels": ks}


def bound(m: dict) -> str:
    """"host" where enqueueing a pass takes longer than the GPU is busy with it; "-" without
    GPU times (CPU smoke runs)."""
    if m["busy"] != m["busy"]:   # NaN: no GPU
        return "-"
    return "host" if m["host"] > m["busy"] else "GPU"


def parts(d: int, T: int, smoke: bool) -> dict:
    """{name: forward+backward closure} for the FFN, the Memory+ layer and its query+search."""
    torch.manual_seed(0)
    layer, values = build(d, smoke)
    x = torch.randn(T, d, device=device(), dtype=torch.bfloat16).requires_grad_()
    g = torch.randn(T, d, device=device(), dtype=torch.bfloat16)
    g_w = torch.randn(T, layer.memory_config.heads * layer.memory_config.k, device=device())
    ffn = SwiGLU(d, ffn_width(d))
    p = values.weight
    p.main_grad = torch.zeros(p.shape, device=device())
    p.memory_deferred_grad = kernels.DeferredTableGrad() if torch.cuda.is_available() else None
    layer_pass = fwd_bwd(lambda: layer(x.view(T, 1, d))[0].view(T, d), g)

    def memory_layer():
        layer_pass()
        if p.memory_deferred_grad is not None:
            p.memory_deferred_grad.fold(p)

    return {"dense SwiGLU FFN": fwd_bwd(lambda: ffn(x), g), "Memory+ layer": memory_layer,
            "query+search": fwd_bwd(lambda: layer.select(x)[1], g_w)}


def python_profile(fn, passes: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(passes):
        fn()
    sync()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def top_kernels(ks, passes: int, top: int) -> list[list]:
    by: dict[str, list] = {}
    for name, s, e in ks:
        acc = by.setdefault(name, [0.0, 0])
        acc[0] += (e - s) / 1e3 / passes
        acc[1] += 1
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])[:top]
    return [[n[:70].replace("|", "/"), f"{ms:.3f}", f"{c / passes:g}"] for n, (ms, c) in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--top", type=int, default=20, help="kernels of query+search listed")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)
    if min(args.tokens) < 1 or args.passes < 1:
        ap.error("--tokens and --passes must be >= 1")
    if args.smoke:
        from tests.kernels.test_embedding_bag import install_interpreter_shim

        install_interpreter_shim()  # numpy >= 2.5 vs Triton 3.6's interpreter
        kernels.use_triton = lambda t: kernels.HAVE_TRITON and not kernels._FORCE_REFERENCE
    # smoke: the fewest tokens and passes that run every part twice (the warm-up and one pass);
    # each kernel program is Python in the interpreter
    d, tokens = (64, [8]) if args.smoke else (args.width, args.tokens)
    passes = 1 if args.smoke else args.passes
    rows, extra, last = [], "", None
    for T in tokens:
        fns = parts(d, T, args.smoke)
        for name, fn in fns.items():
            m = measure(fn, passes)
            rows.append([T, name, f"{m['host']:.3f}", f"{m['wall']:.3f}", f"{m['gpu']:.3f}",
                         f"{m['busy']:.3f}", f"{m['launches']:g}",
                         bound(m)])
            print("  " + " | ".join(map(str, rows[-1])), flush=True)
            last = m if name == "query+search" else last
        if args.cprofile and T == tokens[0]:
            extra += (f"\ncProfile of the Memory+ layer, {passes} passes, T = {T} (tottime):\n\n```\n"
                      + python_profile(fns["Memory+ layer"], passes, 30) + "```\n")
        del fns
    text = env_header(f"Host vs GPU time per forward+backward, d = {d}")
    text += "\n" + md_table(["T", "part", "host ms", "wall ms", "kernel ms", "busy ms", "kernels",
                             "bound"], rows)
    if last and last["kernels"]:
        text += f"\nquery+search at T = {tokens[-1]}: kernels per pass\n\n"
        text += md_table(["kernel", "ms", "launches"], top_kernels(last["kernels"], passes, args.top))
    emit("bench_host_overhead", text + extra, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
