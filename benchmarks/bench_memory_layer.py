# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The whole Memory+ layer, forward+backward, vs a dense SwiGLU FFN of the same width (one GPU).

    python benchmarks/bench_memory_layer.py [--append] [--rep-ms 200] [--smoke]

T = 8192 tokens, bf16 params, N = 2**20 values (n_keys 1024), 4 heads, k 32, k_dim 512,
QK-norm on; d in {2048, 4096}; FFN width 5632 (8/3 d rounded up to 256) at d=2048 and 14336 at
d=4096. The table carries an fp32 ``main_grad`` on the Triton path (the training path). The
reference path returns a dense table gradient into .grad (it cannot use main_grad) and may not
fit at d=4096 (its lookup materialises [T, bag, d] fp32 twice): then it reads "OOM".
Breakdown rows time one part's forward+backward alone: query+search (``select``), lookup
(``values.lookup``), W1/W2 (``mix``), each with the fp32 torch search and the bf16 search; then
the search alone (fp32 reference, fused Triton, bf16 at three re-scoring margins: ms and the
share of sets equal to the fp32 reference's); ``--profile`` adds a per-kernel breakdown. On a
GPU, query+search is also timed replayed from a CUDA graph: its GPU time without the host's
launches, as graphed training runs it.
``--smoke`` runs tiny shapes on CPU (interpreter).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedding_bag import (ROOT, bench_ms, device, emit, env_header, free_memory,  # noqa: E402
                                 graph_replay, md_table)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_memory import kernels  # noqa: E402
from megatron_memory.kernels import bf16_search as bs  # noqa: E402
from megatron_memory.kernels import triton_product_key as pk  # noqa: E402
assert str(ROOT) in sys.path


def build(d: int, smoke: bool):
    from megatron.core.transformer import TransformerConfig

    from megatron_memory.config import MemoryConfig
    from megatron_memory.model.layer import MemoryPlus, MemoryValues

    cfg = TransformerConfig(num_layers=1, hidden_size=d, num_attention_heads=max(1, d // 128),
                            ffn_hidden_size=ffn_width(d), params_dtype=torch.bfloat16,
                            use_cpu_initialization=smoke, perform_initialization=True,
                            add_bias_linear=False, gated_linear_unit=True,
                            activation_func=F.silu, hidden_dropout=0.0, attention_dropout=0.0)
    mc = (MemoryConfig(layers=[0], n_keys=8, heads=2, k=4, k_dim=16) if smoke
          else MemoryConfig(layers=[0], n_keys=1024, heads=4, k=32, k_dim=512, qk_norm=True))
    mc.validate(1, d)
    values = MemoryValues(cfg, mc)
    return MemoryPlus(cfg, mc, values, layer_id=0), values


def ffn_width(d: int) -> int:
    return 14336 if d == 4096 else max(256, (8 * d + 3 * 256 - 1) // (3 * 256) * 256)


class SwiGLU(torch.nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        kw = dict(bias=False, device=device(), dtype=torch.bfloat16)
        self.fc = torch.nn.Linear(d, 2 * ffn, **kw)
        self.proj = torch.nn.Linear(ffn, d, **kw)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


def fwd_bwd(fn, *grads):
    """A closure running fn() and backpropagating `grads` into its outputs."""
    def run():
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward([o for o, g in zip(outs, grads) if g is not None],
                                [g for g in grads if g is not None])
    return run


def time_parts(layer, values, x, rep_ms, graphed: bool = False):
    """ms of the whole layer and of its three parts, each forward+backward; with ``graphed``
    (CUDA) also query+search replayed from a CUDA graph: its GPU time without the host's
    launches, which is what training sees with the memory layers graphed
    (train.cuda_graph_memory)."""
    T, d = x.shape
    H, k = layer.memory_config.heads, layer.memory_config.k
    with torch.no_grad():
        idx, w = layer.select(x)
        y = values.lookup(idx, w).to(x.dtype)
    dev = x.device
    g_out = torch.randn(T, d, device=dev, dtype=x.dtype)
    g_w = torch.randn(T, H * k, device=dev)
    g_y = torch.randn(T, y.shape[1], device=dev, dtype=y.dtype)
    w_req, y_req = w.clone().requires_grad_(), y.clone().requires_grad_()
    x3 = x.view(T, 1, d)
    res = {}
    parts = {
        "Memory+ layer": fwd_bwd(lambda: layer(x3)[0].view(T, d), g_out),
        "query+search": fwd_bwd(lambda: layer.select(x)[1], g_w),
        "lookup": fwd_bwd(lambda: values.lookup(idx, w_req), g_y),
        "W1/W2 (mix)": fwd_bwd(lambda: layer.mix(x, y_req), g_out),
    }
    for name, fn in parts.items():
        try:
            res[name] = bench_ms(fn, rep_ms, grad_to_none=[x, w_req, y_req])
        except torch.OutOfMemoryError:
            res[name] = None
            print(f"  {name}: OOM", flush=True)
        free_memory()
    if graphed and x.is_cuda:
        res["query+search, CUDA graph replay"] = bench_ms(graph_replay(select_grads(layer, x, g_w)),
                                                          rep_ms)
        free_memory()
    return res


class _Select(torch.nn.Module):
    """The layer's query+search as a module (for functional_call): x -> the selected weights."""
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer.select(x)[1]


def select_grads(layer, x, g_w):
    """A closure: query+search forward and the gradients of its weights w.r.t. x and the
    layer's parameters, through views made inside the call. Capturable: the parameters' own
    AccumulateGrad nodes were made on the default stream, and a backward reaching them inside a
    capture makes the capture wait on that stream (megatron_memory/model/graphs.py does the same)."""
    module = _Select(layer)
    names, params = zip(*module.named_parameters())

    def run():
        inputs = [x.detach().requires_grad_().view_as(x)] + [p.view_as(p) for p in params]
        w = torch.func.functional_call(module, dict(zip(names, inputs[1:])), (inputs[0],),
                                       strict=False, tie_weights=False)
        return torch.autograd.grad(w, inputs, g_w, allow_unused=True)
    return run


def search_precision(layer, x, rep_ms):
    """The search alone on the layer's fp32 QK-normed inputs: forward ms, forward+backward ms,
    and the share of (t, h) rows whose selected set equals the fp32 torch reference's; the
    bf16 search at several re-scoring margins, the fused fp32 Triton search for comparison."""
    mc = layer.memory_config
    with torch.no_grad():
        q = layer.query(x).view(x.shape[0], mc.heads, 2, layer.half)
        qn, kn = layer._normalised(q, layer.keys)
    ref_idx = kernels.product_key_search_reference(qn, kn, mc.k)[1].sort(-1).values
    g = torch.randn(x.shape[0], mc.heads, mc.k, device=x.device)
    qg, kg = qn.clone().requires_grad_(), kn.clone().requires_grad_()
    variants = {"torch fp32 reference": kernels.product_key_search_reference,
                "triton fused fp32 (ieee)": pk.triton_product_key_search}
    for margin in (8, 16, 32):
        tag = " (default)" if margin == bs.RESCORE_MARGIN else ""
        variants[f"bf16 + fp32 re-score, margin {margin}{tag}"] = (
            lambda q_, k_, kk, m=margin: bs.bf16_product_key_search(q_, k_, kk, m))

    def topk_select(q_, k_, kk):
        return bs.bf16_product_key_search(q_, k_, kk, select="topk")

    variants["bf16, margin 16, torch.topk candidates"] = topk_select
    rows = []
    for name, fn in variants.items():
        with torch.no_grad():
            idx = fn(qn, kn, mc.k)[1].sort(-1).values
            same = (idx == ref_idx).all(-1).float().mean().item()
            fwd = bench_ms(lambda: fn(qn, kn, mc.k), rep_ms)
        both = bench_ms(fwd_bwd(lambda: fn(qg, kg, mc.k)[0], g), rep_ms, grad_to_none=[qg, kg])
        rows.append([name, f"{fwd:.3f}", f"{both:.3f}", f"{same * 100:.3f}%"])
        free_memory()
    return rows


def profile_layer(layer, x, top: int = 14):
    """CUDA time per kernel of one Memory+ layer forward+backward (torch profiler, 3 passes)."""
    from torch.profiler import ProfilerActivity, profile

    T, d = x.shape
    g = torch.randn(T, d, device=x.device, dtype=x.dtype)
    run = fwd_bwd(lambda: layer(x.view(T, 1, d))[0].view(T, d), g)
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    rows = [[e.key[:70].replace("|", "/"), f"{e.device_time_total / 3e3:.3f}",
             f"{e.device_time_total / total:.1%}"] for e in events[:top]]
    rows.append(["all kernels", f"{total / 3e3:.3f}", "100%"])
    return rows


def time_micro_batches(layer, values, T: int, micro: int, rep_ms: int) -> dict:
    """ms per micro-batch of ``micro`` layer forward+backward passes on different inputs, with the
    table gradient added per lookup or folded once at the end (train.defer_table_grad)."""
    d = layer.config.hidden_size
    xs = [torch.randn(T, 1, d, device=device(), dtype=torch.bfloat16).requires_grad_()
          for _ in range(micro)]
    g = torch.randn(T, 1, d, device=device(), dtype=torch.bfloat16)
    p = values.weight

    def step():
        for x in xs:
            torch.autograd.backward(layer(x)[0], g)
        if getattr(p, "memory_deferred_grad", None) is not None:
            p.memory_deferred_grad.fold(p)

    res = {}
    for name, deferred in ((f"Memory+ layer, {micro} micro-batches: per-lookup main_grad", None),
                           (f"Memory+ layer, {micro} micro-batches: deferred fold",
                            kernels.DeferredTableGrad())):
        p.memory_deferred_grad = deferred
        try:
            res[name] = bench_ms(step, rep_ms, grad_to_none=xs) / micro
        except torch.OutOfMemoryError:
            res[name] = None
            print(f"  {name}: OOM", flush=True)
        p.memory_deferred_grad = None
        free_memory()
    return res


def bench_width(d: int, T: int, rep_ms: int, smoke: bool, profile: bool, top: int = 14,
                micro: int = 8):
    torch.manual_seed(0)
    layer, values = build(d, smoke)
    x = torch.randn(T, d, device=device(), dtype=torch.bfloat16).requires_grad_()
    ffn = SwiGLU(d, ffn_width(d))
    g = torch.randn(T, d, device=device(), dtype=torch.bfloat16)
    t_ffn = bench_ms(fwd_bwd(lambda: ffn(x), g), rep_ms, grad_to_none=[x])
    del ffn
    free_memory()
    values.weight.main_grad = torch.zeros(values.weight.shape, device=device())
    layer.memory_config.search = "torch"
    old = time_parts(layer, values, x, rep_ms)
    layer.memory_config.search = "bf16"
    new = time_parts(layer, values, x, rep_ms, graphed=True)
    if micro > 1:
        new.update(time_micro_batches(layer, values, T, micro, rep_ms))
    prec = search_precision(layer, x, rep_ms) if not smoke else []
    prof = profile_layer(layer, x, top) if profile and not smoke else []
    del layer, values, x
    free_memory()

    def fmt(ms):
        return "OOM" if ms is None else f"{ms:.3f}"

    rows = [[d, "dense SwiGLU FFN", "-", f"{t_ffn:.3f}", "-", "1.00"]]
    for name in new:
        r, t = old.get(name), new[name]
        rows.append([d, name, fmt(r) if name in old else "-", fmt(t),
                     f"{r / t:.2f}x" if r and t else "n/a", f"{t / t_ffn:.2f}" if t else "n/a"])
    for r in rows:
        print("  " + " | ".join(str(c) for c in r), flush=True)
    return rows, [[d] + r for r in prec], [[d] + r for r in prof]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench rep time per measurement")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter check)")
    ap.add_argument("--profile", action="store_true", help="kernel-time breakdown of the layer")
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--top", type=int, default=14, help="kernels listed by --profile")
    ap.add_argument("--micro-batches", type=int, default=8,
                    help="also time this many passes per step, table gradient per lookup vs "
                         "deferred (ms per micro-batch, bf16 search; 1: skip)")
    args = ap.parse_args()
    if args.micro_batches < 1:
        ap.error(f"--micro-batches must be >= 1, got {args.micro_batches}")
    if args.smoke:
        from tests.kernels.test_embedding_bag import install_interpreter_shim

        install_interpreter_shim()  # numpy >= 2.5 vs Triton 3.6's interpreter
    if args.smoke:  # the interpreter runs the Triton ops on CPU tensors
        kernels.use_triton = lambda t: kernels.HAVE_TRITON and not kernels._FORCE_REFERENCE
    widths, T = ((64,), 32) if args.smoke else (tuple(args.widths), 8192)
    rows, prec, prof = [], [], []
    for d in widths:
        r, p, f = bench_width(d, T, args.rep_ms, args.smoke, args.profile, args.top,
                              2 if args.smoke else args.micro_batches)
        rows += r
        prec += p
        prof += f
    text = env_header(f"Memory+ layer vs dense FFN (T={T}, bf16, N=2^20, heads 4, k 32, "
                      f"k_dim 512, QK-norm)")
    text += ("\nms of forward+backward, Triton lookup with the table grad into fp32 main_grad; "
             "'fp32 search' = the torch fp32 search (the previous default), 'bf16 search' = bf16 "
             "tensor-core scores with fp32 re-scoring (the default now). Last column: bf16-search "
             "time / dense FFN time. 'micro-batches' rows: ms per micro-batch of that many "
             "passes on different inputs, the table gradient added per lookup or folded once "
             "(--defer-table-grad).\n\n")
    text += md_table(["d", "part", "fp32 search ms", "bf16 search ms", "speed-up", "bf16/FFN"], rows)
    if prec:
        text += "\nSearch alone (fp32 QK-normed inputs; sets compared with the fp32 reference):\n\n"
        text += md_table(["d", "search", "fwd ms", "fwd+bwd ms", "same sets"], prec)
    if prof:
        text += "\nMemory+ layer fwd+bwd, CUDA time per kernel (torch profiler, ms per pass):\n\n"
        text += md_table(["d", "kernel", "ms", "share"], prof)
    emit("bench_memory_layer", text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
