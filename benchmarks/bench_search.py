# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The bf16 product-key search's re-scoring step and the query prologue, before/after fusion,
from a decode step (T = 1) to a training micro-batch (T = 8192), one GPU.

    python3 benchmarks/bench_search.py [--tokens 1 4 16 64 256 8192] [--append]
    python3 benchmarks/bench_search.py --smoke        # CPU, Triton interpreter, tiny shapes

Shapes: the layer's (4 heads, n = 1024 sub-keys per half, half = 256, k = 32), unit-RMS fp32
queries and keys scaled 1/sqrt(half) as the QK-norm gives them. Rows per T:
  search forward with rescore="loop" (serial re-scoring kernel + torch.topk + padding copies),
  "fused" (``_rescore_topk_kernel``), and fused with the bf16 keys cast once (the standalone
  model's inference cache); the share of rows whose selected set equals the loop's;
  the decode search (kernels/decode_search.py) up to T = 256 and its agreement with the fp32
  reference; query prologue: the six torch ops of the standalone model vs ``kernels/query_prologue.py``.
Timing: CUDA graphs of 20 calls (``triton.testing.do_bench_cudagraph``) up to T = 256, where a
call is a few microseconds and Python launch time would hide it; do_bench (L2 flushed) above.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedding_bag import ROOT, bench_ms, emit, env_header, md_table  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_memory.kernels import bf16_search as bs  # noqa: E402
from megatron_memory.kernels import triton_product_key as pk  # noqa: E402
from megatron_memory.kernels.decode_search import MAX_TOKENS, decode_config, decode_product_key_search  # noqa: E402
from megatron_memory.kernels.reference import product_key_search_reference  # noqa: E402
from megatron_memory.kernels.query_prologue import triton_query_prologue  # noqa: E402

assert str(ROOT) in sys.path
GRAPH_MAX_T = 256
DECODE_MAX_T = 256   # the decode search is timed up to here (the dispatcher uses it to MAX_TOKENS)


def timed(fn, T: int, rep_ms: int) -> float:
    if not torch.cuda.is_available():
        return bench_ms(fn, rep_ms)
    if T > GRAPH_MAX_T:
        return bench_ms(fn, rep_ms)
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def layer_like(T, H, n, half, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 2, half, generator=gen)
    K = torch.randn(H, 2, n, half, generator=gen)
    K = K / K.pow(2).mean(-1, keepdim=True).sqrt() * half ** -0.5
    q = q / q.pow(2).mean(-1, keepdim=True).sqrt()
    return q.to(dev), K.to(dev)


def search_row(T, H, n, half, k, dev, rep_ms):
    q, K = layer_like(T, H, n, half, dev, seed=T)
    kb = K.to(torch.bfloat16)
    with torch.no_grad():
        ref = product_key_search_reference(q, K, k)[1].sort(-1).values
        split = decode_product_key_search(q, K, k)[1].sort(-1).values if T <= DECODE_MAX_T else None
        dec = timed(lambda: decode_product_key_search(q, K, k), T, rep_ms) if split is not None else None

    def run(mode, cached=False):
        return bs.bf16_search_forward(q, K, k, kb=kb if cached else None, rescore=mode)

    with torch.no_grad():
        want = run("loop")[1].sort(-1).values
        same = (run("fused")[1].sort(-1).values == want).all(-1).float().mean().item()
        ms = [timed(lambda m=m, c=c: run(m, c), T, rep_ms)
              for m, c in (("loop", False), ("fused", False), ("fused", True))]
    dec_cols = ["-", "-"] if dec is None else [
        f"{dec * 1e3:.1f}", f"{(split == ref).all(-1).float().mean().item() * 100:.2f}%"]
    return [T, *(f"{x * 1e3:.1f}" for x in ms), f"{ms[0] / ms[1]:.2f}x", f"{ms[0] / ms[2]:.2f}x",
            f"{same * 100:.2f}%", *dec_cols]


def prologue_row(T, H, half, dev, rep_ms):
    """The standalone model's ops: cast, - mean, * scale, + shift, rms_norm, * gain."""
    width = H * 2 * half
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(T, width, generator=gen).to(dev, torch.bfloat16)
    mean, shift, scale, gain = (torch.randn(width, generator=gen).to(dev) for _ in range(4))

    def torch_ops():
        x = (q.float() - mean) * scale + shift
        return F.rms_norm(x.view(T, H, 2, half), (half,), eps=1e-6) * gain.view(H, 2, half)

    def fused():
        return triton_query_prologue(q, gain, 1e-6, half, "batchnorm", mean, scale, shift)

    err = (fused() - torch_ops()).abs().max().item()
    a, b = timed(torch_ops, T, rep_ms), timed(fused, T, rep_ms)
    return [T, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{a / b:.2f}x", f"{err:.1e}"]


def kernel_table(title: str, fn, calls: int) -> str:
    """Per-kernel CUDA time (us per call) of ``fn``, torch profiler."""
    from torch.profiler import ProfilerActivity, profile  # only with --profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                    key=lambda e: -e.device_time_total)
    rows = [[e.key[:60].replace("|", "/"), f"{e.device_time_total / calls:.1f}", e.count // calls]
            for e in events]
    total = sum(e.device_time_total for e in events) / calls
    return (f"\n\n{title}: kernels per call, {total:.1f} us in all\n\n"
            + md_table(["kernel", "us", "launches"], rows))


def profile_t1(H, n, half, k, dev, calls: int = 20) -> str:
    """Per-kernel CUDA time of the two T = 1 searches."""
    q, K = layer_like(1, H, n, half, dev)
    kb = K.to(torch.bfloat16)
    text = ""
    for name, fn in (("decode search", lambda: decode_product_key_search(q, K, k)),
                     ("bf16 search, fused re-scoring, cached keys", lambda: bs.bf16_search_forward(q, K, k, kb=kb))):
        with torch.no_grad():
            text += kernel_table(f"T = 1, {name}", fn, calls)
    return text + "\n"


def profile_training(T, H, n, half, k, dev, calls: int = 10) -> str:
    """Per-kernel CUDA time of the training search at T tokens: forward, and forward+backward
    (gradients to the query and the keys, as in the layer)."""
    q, K = layer_like(T, H, n, half, dev)
    q.requires_grad_(True)
    K.requires_grad_(True)
    g = torch.randn(T, H, k, device=dev)

    def fwd_bwd():
        scores, _ = bs._Bf16Search.apply(q, K, k, bs.RESCORE_MARGIN, None)
        scores.backward(g)

    with torch.no_grad():
        text = kernel_table(f"T = {T}, training search forward", lambda: bs.bf16_search_forward(q, K, k), calls)
    return text + kernel_table(f"T = {T}, training search forward + backward", fwd_bwd, calls) + "\n"


def sweep_decode(H, n, half, k, dev, rep_ms, tokens=(1, 4, 16)) -> str:
    """Decode-search tiles: us per call at a few T for each (BLOCK_N, BLOCK_D, warps)."""
    rows = []
    for bn in (32, 64, 128):
        for bd in (64, 128, 256):
            for w in (2, 4, 8):
                cfg = dict(BLOCK_N=bn, BLOCK_D=bd, num_warps=w)
                row = [bn, bd, w]
                for T in tokens:
                    q, K = layer_like(T, H, n, half, dev)
                    with torch.no_grad():
                        row.append(f"{timed(lambda: decode_product_key_search(q, K, k, cfg), T, rep_ms) * 1e3:.1f}")
                rows.append(row)
    return ("\n\nDecode search tiles (default " + str(decode_config(half, 32)) + "):\n\n"
            + md_table(["BLOCK_N", "BLOCK_D", "warps"] + [f"T={T} us" for T in tokens], rows) + "\n")


# Tiles the training-size sweep tries. Each compiles for sm_90 without spills (checked with
# tests/kernels/test_embedding_bag.sm90_compile on 2026-11-28; the tests compile the defaults).
SWEEP = {
    "select (ROWS, warps, early exit)": [(1, 2, False), (1, 4, False), (1, 8, False),
                                          (2, 4, False), (1, 2, True), (1, 4, True),
                                          (2, 2, True), (2, 4, True)],
    "rescore (BLOCK_D, warps)": [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8)],
    "product step (rows, warps)": [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 2), (8, 4),
                                   (16, 4), (16, 8), (32, 4), (32, 8)],
}


def _set_tile(kind: str, tile) -> None:
    """Install one tile (None: the defaults) of a sweep kind in the kernels' module knobs."""
    if kind.startswith("select"):
        bs.SELECT_TILE = (dict(_DEFAULTS["select"]) if tile is None
                          else dict(ROWS=tile[0], num_warps=tile[1], EARLY=tile[2]))
    elif kind.startswith("rescore"):
        bs.RESCORE_TILE = None if tile is None else dict(BLOCK_D=tile[0], num_warps=tile[1])
    else:
        pk.CANDIDATES_TILE = _DEFAULTS["product"] if tile is None else tile


_DEFAULTS = {"select": dict(bs.SELECT_TILE), "product": pk.CANDIDATES_TILE}


def sweep_training(T, H, n, half, k, dev, rep_ms) -> str:
    """Training search forward (ms per call) with each kernel's tiles varied one kernel at a time,
    the others at their defaults; for each, the share of (t, h) rows whose selected set equals
    the fp32 reference's (re-scoring tiles change the fp32 summation order, so near-ties may
    differ; the select and product-step tiles cannot change a result)."""
    q, K = layer_like(T, H, n, half, dev)
    with torch.no_grad():
        ref = product_key_search_reference(q, K, k)[1].sort(-1).values

        def agree() -> str:
            got = bs.bf16_search_forward(q, K, k)[1].sort(-1).values
            return f"{(got == ref).all(-1).float().mean().item() * 100:.3f}%"

        base = bench_ms(lambda: bs.bf16_search_forward(q, K, k), rep_ms)
        rows = [["defaults", "-", f"{base * 1e3:.1f}", "1.00x", agree()]]
        for kind, tiles in SWEEP.items():
            for tile in tiles:
                _set_tile(kind, tile)
                try:
                    same = agree()
                    ms = bench_ms(lambda: bs.bf16_search_forward(q, K, k), rep_ms)
                finally:
                    _set_tile(kind, None)
                rows.append([kind, str(tile), f"{ms * 1e3:.1f}", f"{base / ms:.2f}x", same])
    return (f"\n\nT = {T}: training search forward by kernel tile (us per call; speed-up vs the "
            f"defaults; share of rows whose set equals the fp32 reference's)\n\n"
            + md_table(["kernel", "tile", "us", "speed-up", "= fp32 reference sets"], rows) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 8192])
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--append", action="store_true", help="append the report to benchmarks/RESULTS.md")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of the T = 1 searches and a sweep of the decode search's tiles")
    ap.add_argument("--sweep", type=int, nargs="*", default=[],
                    help="time the training search forward at these T with each kernel's tiles varied")
    ap.add_argument("--profile-tokens", type=int, nargs="*", default=[],
                    help="per-kernel times of the training search (forward, forward + backward) at these T")
    args = ap.parse_args(argv)
    if any(t < 1 for t in args.tokens + args.profile_tokens + args.sweep) or args.rep_ms < 1:
        ap.error("--tokens, --profile-tokens, --sweep and --rep-ms must be positive")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--smoke runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1")
        H, n, half, k, dev, tokens = 2, 64, 16, 8, "cpu", [1, 5]
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or --smoke with TRITON_INTERPRET=1")
    else:
        H, n, half, k, dev, tokens = 4, 1024, 256, 32, "cuda", args.tokens
    search = [search_row(T, H, n, half, k, dev, args.rep_ms) for T in tokens]
    prologue = [prologue_row(T, H, half, dev, args.rep_ms) for T in tokens]
    text = env_header("bf16 search re-scoring and query prologue, before/after fusion (bench_search.py)")
    text += (f"\nH={H}, n={n}, half={half}, k={k}, margin {bs.RESCORE_MARGIN}; microseconds per call "
             f"(CUDA graphs up to T={GRAPH_MAX_T}, do_bench above).\n\n")
    text += md_table(["T", "loop us", "fused us", "fused + cached bf16 keys us", "loop/fused",
                      "loop/fused+cache", "same sets", "decode search us",
                      "decode = fp32 reference sets"], search)
    text += (f"\n\nThe dispatcher runs the decode search (kernels/decode_search.py, exact fp32, "
             f"sub-keys split across programs) for T <= {MAX_TOKENS} without gradients.\n")
    text += "\n\nQuery prologue (batchnorm, QK-norm, gain; bf16 input):\n\n"
    text += md_table(["T", "torch ops us", "fused us", "speed-up", "max abs diff"], prologue) + "\n"
    if args.profile and not args.smoke:
        text += profile_t1(H, n, half, k, dev) + sweep_decode(H, n, half, k, dev, args.rep_ms)
    if not args.smoke:
        text += "".join(profile_training(T, H, n, half, k, dev) for T in args.profile_tokens)
    text += "".join(sweep_training(T, H, n, half, k, dev, args.rep_ms) for T in args.sweep)
    emit("bench_search", text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
