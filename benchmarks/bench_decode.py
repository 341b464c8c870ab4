# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Decode latency per token: dense vs Memory+ vs a parameter-matched MoE, same base, one card.

    python3 benchmarks/bench_decode.py [--bases 1.3b 8b] [--batches 1 2 4 ... 256] [--append]
    python3 benchmarks/bench_decode.py --tiny          # CPU, tiny preset, seconds (a check)
    python3 benchmarks/bench_decode.py --plot a.csv b.csv --png decode.png   # PNG from CSVs

Models (benchmarks/decode_models.py): the standalone model with random bf16 weights built from
the preset ``<base>-memory`` (1.3b: d=2048, 22 layers; 8b: d=4096, 32 layers, 8 KV groups;
memory layers 4/12/20, 2^20 values, 4 heads x top-32) and vocabulary --vocab: ``dense`` (SwiGLU
in every layer), ``memory`` (Memory+ in the memory layers) and ``moe`` (top-2 of E half-width
SwiGLU experts there, E matched to the Memory+ layer's parameters).

Per model and batch b: prefill b random prompts of --prompt tokens into a static KV cache, then
time --steps greedy decode steps (embedding to argmax, the token fed back) with CUDA events,
--repeats times from the same cache position, median. Modes: ``graph`` (one decode step
captured in a CUDA graph and replayed: GPU time without Python launch overhead; every model is
captured, or the mode is reported as unavailable for it) and ``eager`` (the Python loop as the
standalone model runs it). The floor is the bytes a step must read (weights, the table rows
and experts it touches; decode_models.step_bytes) over the measured device copy bandwidth.

Writes the markdown report (printed; $OUT/bench_decode_<bases>.md; RESULTS.md with --append), a CSV and,
when matplotlib is importable, a PNG (--csv / --png, default $OUT or build/decode/).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedding_bag import (ROOT, copy_gbps, emit, env_header, free_memory,  # noqa: E402
                                 graph_replay, md_table)

import torch  # noqa: E402

from decode_models import (MODELS, MoEFFN, StaticKVCache, build, decode_step, kv_bytes,  # noqa: E402
                           memory_layer_params, moe_experts, param_count, step_bytes)
from megatron_memory.configs.presets import get_preset  # noqa: E402
from megatron_memory.export.hf_format import hf_config  # noqa: E402
from megatron_memory.export.standalone import ModelArgs  # noqa: E402

assert str(ROOT) in sys.path
BASES = {"1.3b": "1.3b-memory", "8b": "8b-memory", "tiny": "tiny"}
LABELS = {"dense": "dense", "memory": "Memory+", "moe": "MoE"}
CSV_FIELDS = ["base", "mode", "model", "batch", "ms_per_token", "floor_ms", "step_gb", "kv_gb"]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", nargs="+", default=["1.3b", "8b"], choices=["1.3b", "8b"],
                    help="model widths (presets <base>-memory / -dense)")
    ap.add_argument("--batches", nargs="+", type=int, default=[2 ** i for i in range(9)])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens prefilled per sequence")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (embedding, output layer)")
    ap.add_argument("--modes", nargs="+", default=["graph", "eager"], choices=["graph", "eager"])
    ap.add_argument("--moe-backend", default="auto", choices=["auto", "grouped", "loop"],
                    help="auto: grouped GEMM if it matches the per-expert loop on this device")
    ap.add_argument("--memory-path", default="fused", choices=["fused", "unfused"],
                    help="unfused: Memory+ decodes as before run 19 (the bf16 search at every T "
                         "with serial candidate re-scoring + torch.topk, the query norm as six "
                         "torch kernels, keys cast to bf16 every step), for a before/after in the "
                         "same call")
    ap.add_argument("--profile", action="store_true",
                    help="also list the kernels of one eager batch-1 decode step of dense and Memory+")
    ap.add_argument("--tiny", action="store_true", help="tiny preset on CPU, fp32, a few seconds")
    ap.add_argument("--append", action="store_true", help="append the report to benchmarks/RESULTS.md")
    ap.add_argument("--csv", type=Path, default=None, help="CSV output (default $OUT or build/decode)")
    ap.add_argument("--png", type=Path, default=None, help="PNG output (default next to the CSV)")
    ap.add_argument("--plot", type=Path, nargs="+", default=None, metavar="CSV",
                    help="only draw --png from these CSVs (one column per base)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tiny" in argv:  # its defaults; flags given still apply
        ap.set_defaults(batches=[1, 2, 4], prompt=8, steps=4, repeats=1, warmup=1, vocab=256,
                        modes=["eager"])
    args = ap.parse_args(argv)
    if args.tiny:
        args.bases = ["tiny"]
    bad = []
    for name, lo in (("prompt", 1), ("steps", 1), ("repeats", 1), ("warmup", 1), ("vocab", 2)):
        if getattr(args, name) < lo:
            bad.append(f"--{name} must be >= {lo}, got {getattr(args, name)}")
    if any(b < 1 for b in args.batches):
        bad.append(f"--batches must be positive, got {args.batches}")
    missing = [str(f) for f in args.plot or [] if not f.is_file()]
    if missing:
        bad.append(f"--plot {missing[0]}: no such CSV file")
    if args.plot is not None and args.png is None:
        bad.append("--plot needs --png (where to write the figure)")
    if args.tiny and "graph" in args.modes:
        bad.append("--tiny runs on CPU, where --modes graph (CUDA graphs) is not available")
    if args.plot is None and not args.tiny and not torch.cuda.is_available():
        bad.append("no CUDA device: run on a GPU, or --tiny for the CPU check")
    if bad:
        ap.exit(2, f"error: {bad[0]}\n")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "build" / "decode"
    args.csv = args.csv or out / ("decode_tiny.csv" if args.tiny else "decode.csv")
    args.png = args.png or args.csv.with_suffix(".png")
    return args


def use_unfused_memory_path() -> None:
    """Route this process's Memory+ decode through the pre-fusion path (--memory-path unfused)."""
    from megatron_memory.export import standalone
    from megatron_memory.kernels import decode_search

    search = standalone.product_key_search
    decode_search.MAX_TOKENS = 0
    standalone.fused_query_prologue = None
    standalone.product_key_search = lambda q, keys, k, keys_bf16=None: search(q, keys, k,
                                                                             rescore="loop")


def model_args(base: str, vocab: int) -> ModelArgs:
    return ModelArgs.from_config(hf_config(get_preset(BASES[base]), vocab))


def choose_moe_backend(requested: str, device, dtype) -> tuple[str, str]:
    """(backend, note): with auto, the grouped GEMM if it runs and matches the per-expert loop
    at 1, 3 and 37 tokens (empty experts included) on this device, else the loop."""
    if requested != "auto":
        return requested, f"MoE backend {requested} (requested)"
    torch.manual_seed(0)
    moe = MoEFFN(64, 32, 8).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
        try:
            for t in (1, 3, 37):
                x = torch.randn(1, t, 64, device=device, dtype=dtype)
                moe.backend = "grouped"
                got = moe(x)
                moe.backend = "loop"
                torch.testing.assert_close(got, moe(x), rtol=2e-2, atol=2e-2)
        except (RuntimeError, AssertionError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return "loop", f"MoE backend loop: grouped_mm failed its check ({first[:120]})"
    return "grouped", "MoE backend grouped (torch grouped_mm; matches the per-expert loop)"


class Timer:
    """Milliseconds of n calls of fn: CUDA events on GPU, wall clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, n: int) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


@torch.no_grad()
def measure(model, a: ModelArgs, batch: int, args, modes: list[str], device, dtype) -> dict:
    """{mode: ms per decode step (median of repeats), or an error string}."""
    length = -(-(args.prompt + max(args.steps, args.warmup) + 1) // 16) * 16  # mask rows aligned
    cache = StaticKVCache(a, batch, length, device, dtype)
    gen = torch.Generator(device=device).manual_seed(batch)
    ids = torch.randint(0, a.vocab_size, (batch, args.prompt), device=device, generator=gen)
    pos = torch.zeros((), dtype=torch.int64, device=device)
    tok = decode_step(model, ids, pos, cache).argmax(-1, keepdim=True)          # prefill

    def one():
        tok.copy_(decode_step(model, tok, pos, cache).argmax(-1, keepdim=True))
        pos.add_(1)

    timer, out = Timer(device.type == "cuda"), {}
    for mode in modes:
        run = one
        try:
            if mode == "graph":
                pos.fill_(args.prompt)  # the capture's warm-up decodes from the prompt on
                run = graph_replay(one, args.warmup)
            pos.fill_(args.prompt)
            for _ in range(args.warmup):
                run()
            times = []
            for _ in range(args.repeats):
                pos.fill_(args.prompt)
                times.append(timer(run, args.steps) / args.steps)
            out[mode] = statistics.median(times)
        except torch.cuda.OutOfMemoryError:
            out[mode] = "OOM"
        except RuntimeError as err:  # a capture the model's ops do not allow
            out[mode] = f"failed: {str(err).strip().splitlines()[0][:100]}"
        finally:
            del run
            free_memory()
    return out


@torch.no_grad()
def profile_step(model, a: ModelArgs, args, device, dtype) -> tuple[int, str]:
    """(kernels launched by one batch-1 decode step, top-15 table by device time) from the torch
    profiler, after the prefill and a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    cache = StaticKVCache(a, 1, -(-(args.prompt + 2) // 16) * 16, device, dtype)
    pos = torch.zeros((), dtype=torch.int64, device=device)
    tok = decode_step(model, torch.zeros(1, args.prompt, dtype=torch.int64, device=device), pos,
                      cache).argmax(-1, keepdim=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    decode_step(model, tok, pos.fill_(args.prompt), cache)  # warm-up: compiles, caches
    with profile(activities=acts) as prof:
        decode_step(model, tok, pos, cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"] if device.type == "cuda" else []
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return len(events), prof.key_averages().table(sort_by=sort, row_limit=15)


def run_base(base: str, args, device, dtype, bandwidth: float, backend: str) -> tuple[str, list]:
    """Measure the three models of one base: (report text, CSV rows)."""
    a = model_args(base, args.vocab)
    experts, f = moe_experts(a)
    rows, times, counts, profiles = [], {}, {}, []
    for kind in MODELS:
        model = build(a, kind, device, dtype, backend=backend)
        counts[kind] = param_count(model)
        if args.profile and kind != "moe":
            kernels, table = profile_step(model, a, args, device, dtype)
            profiles.append(f"\n{LABELS[kind]}, batch 1, eager: {kernels} kernels per decode step\n\n"
                            f"```\n{table}\n```\n")
        modes = [m for m in args.modes if not (m == "graph" and kind == "moe" and backend == "loop")]
        for b in args.batches:
            try:
                got = measure(model, a, b, args, modes, device, dtype)
            except torch.cuda.OutOfMemoryError:  # the prefill or the cache itself
                got = dict.fromkeys(modes, "OOM")
                free_memory()
            sb, kv = step_bytes(model, kind, a, b), kv_bytes(a, b, args.prompt + args.steps / 2, 2)
            for mode in args.modes:
                ms = got.get(mode, "n/a: the loop backend syncs")
                times[mode, kind, b] = ms
                rows.append(dict(base=base, mode=mode, model=kind, batch=b,
                                 ms_per_token=ms if isinstance(ms, float) else "",
                                 floor_ms=sb / bandwidth / 1e6, step_gb=sb / 1e9, kv_gb=kv / 1e9))
            print(f"{base} {kind} b={b}: " + ", ".join(
                f"{m} {v:.3f} ms" if isinstance(v, float) else f"{m} {v}" for m, v in got.items()),
                flush=True)
        del model
        free_memory()
    mem_layer = memory_layer_params(a)
    moe_layer = experts * (3 * a.hidden_size * f + a.hidden_size)
    text = (f"\n### Base {base} (preset {BASES[base]}): d={a.hidden_size}, {a.num_hidden_layers} layers, "
            f"{a.num_attention_heads} heads / {a.num_key_value_heads} KV groups, FFN {a.intermediate_size}, "
            f"vocab {a.vocab_size}; memory layers {list(a.memory_layers)}, "
            f"{a.memory_n_keys ** 2} values x {a.memory_v_dim}, {a.memory_heads} heads x top-{a.memory_k}\n\n"
            f"Parameters: dense {billions(counts['dense'])}, Memory+ {billions(counts['memory'])}, "
            f"MoE {billions(counts['moe'])}. MoE: {experts} experts of width {f} (half the dense "
            f"FFN), top-2 (active FFN parameters = dense), {moe_layer / 1e6:.1f}M parameters per layer "
            f"vs Memory+ {mem_layer / 1e6:.1f}M (its own weights + 1/{len(a.memory_layers)} of the "
            f"table): {100 * (moe_layer / mem_layer - 1):+.2f}%.\n")
    for mode in args.modes:
        text += f"\n**{mode}** (ms per decode step = per token of each sequence; floor = step bytes / copy bandwidth)\n\n"
        text += md_table(["batch", "dense ms", "Memory+ ms", "MoE ms", "Memory+/dense", "MoE/dense",
                          "Memory+/MoE", "floor dense", "floor Memory+", "floor MoE", "KV GB"],
                         [table_row(times, mode, b, rows, base) for b in args.batches])
    return text + "".join(profiles), rows


def billions(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def table_row(times: dict, mode: str, b: int, rows: list, base: str) -> list:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    def ratio(x, y):
        x, y = times[mode, x, b], times[mode, y, b]
        return f"{x / y:.3f}x" if isinstance(x, float) and isinstance(y, float) else "-"

    floors = {r["model"]: r for r in rows if r["base"] == base and r["mode"] == mode and r["batch"] == b}
    return ([b] + [fmt(times[mode, k, b]) for k in MODELS]
            + [ratio("memory", "dense"), ratio("moe", "dense"), ratio("memory", "moe")]
            + [f"{floors[k]['floor_ms']:.3f}" for k in MODELS] + [f"{floors['dense']['kv_gb']:.2f}"])


def write_csv(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


def plot(csv_paths: list[Path], png: Path) -> bool:
    """Latency per token vs batch (log-log) and the ratio to dense, one column per base; False
    when matplotlib is missing (the CSV stays; run --plot here)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = []
    for path in csv_paths:
        with open(path) as f:
            rows += list(csv.DictReader(f))
    bases = list(dict.fromkeys(r["base"] for r in rows))
    fig, axes = plt.subplots(2, len(bases), figsize=(6 * len(bases), 8), squeeze=False)
    colors = {"dense": "tab:blue", "memory": "tab:green", "moe": "tab:red"}
    for col, base in enumerate(bases):
        top, bottom = axes[0][col], axes[1][col]
        for mode, style in (("graph", "-"), ("eager", "--")):
            pts = {k: [(int(r["batch"]), float(r["ms_per_token"]), float(r["floor_ms"]))
                       for r in rows if r["base"] == base and r["mode"] == mode and r["model"] == k
                       and r["ms_per_token"]] for k in MODELS}
            dense = {b: ms for b, ms, _ in pts["dense"]}
            for k, series in pts.items():
                if not series:
                    continue
                bs, ms, floor = zip(*series)
                top.plot(bs, ms, style, marker="o", color=colors[k], label=f"{LABELS[k]} ({mode})")
                if mode == "graph" or "graph" not in {r["mode"] for r in rows}:
                    top.plot(bs, floor, ":", color=colors[k], alpha=0.6)
                rb = [(b, m / dense[b]) for b, m, _ in series if b in dense]
                if rb:
                    bottom.plot(*zip(*rb), style, marker="o", color=colors[k], label=f"{LABELS[k]} ({mode})")
        top.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms per decode step",
                title=f"{base}: decode latency (dotted: byte floor)")
        bottom.axhline(1.05, color="grey", lw=0.8, ls=":")
        bottom.set(xscale="log", xlabel="batch", ylabel="latency / dense", title=f"{base}: ratio to dense")
        for ax in (top, bottom):
            ax.set_xticks(sorted({int(r["batch"]) for r in rows}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot is not None:
        ok = plot(args.plot, args.png)
        print(f"wrote {args.png}" if ok else "error: matplotlib is not installed", file=sys.stderr)
        return 0 if ok else 2
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.memory_path == "unfused":
        use_unfused_memory_path()
    bandwidth = copy_gbps(50, 1 << 24 if args.tiny else 1 << 30)
    backend, note = choose_moe_backend(args.moe_backend, device, dtype)
    print(f"copy bandwidth {bandwidth:.0f} GB/s; {note}", flush=True)
    text = env_header("Decode latency: dense vs Memory+ vs MoE (bench_decode.py)")
    text += (f"\nOne card, {dtype}, random weights; prompt {args.prompt} tokens prefilled, then "
             f"{args.steps} greedy decode steps timed (median of {args.repeats}), static KV cache. "
             f"Copy bandwidth {bandwidth:.0f} GB/s (read+write). {note}. Memory+ decode path: "
             f"{args.memory_path}.\n")
    rows = []
    for base in args.bases:
        part, base_rows = run_base(base, args, device, dtype, bandwidth, backend)
        text, rows = text + part, rows + base_rows
    write_csv(args.csv, rows)
    drawn = plot([args.csv], args.png)
    text += f"\nCSV {args.csv.name}" + (f", PNG {args.png.name}" if drawn else
                                         " (no matplotlib here: draw it with --plot)") + ".\n"
    emit("bench_decode_" + "_".join(args.bases), text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
