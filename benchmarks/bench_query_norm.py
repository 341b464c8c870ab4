# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The memory query's training normalisation (query BatchNorm over tokens, QK-norm, gain): the
fused op of kernels/query_norm_train.py against the layer's torch path (``QueryBatchNorm`` in
training, then ``F.rms_norm`` per half-row times the gain), forward and forward+backward, bf16 q
and parameters, a padding mask. Eager times include the host's launches; CUDA-graph times are
GPU time alone. The byte floor: read q, write the fp32 output; backward: read q and the output
gradient, write dq. ``--sweep`` times other launch settings of the op.

    python benchmarks/bench_query_norm.py [--tokens 8192] [--heads 4] [--half 256] [--sweep] [--append]
    TRITON_INTERPRET=1 python benchmarks/bench_query_norm.py --smoke    # CPU check of the script
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_embedding_bag import bench_ms, device, emit, env_header, md_table  # noqa: E402
from megatron_memory.config import QueryNorm  # noqa: E402
from megatron_memory.kernels import query_norm_train as qnt  # noqa: E402
from megatron_memory.model.query_norm import QueryBatchNorm  # noqa: E402

# --sweep: settings of kernels/query_norm_train.py, each varied alone ("reduce" etc.: TILES entries)
SWEEP = ([dict(STATS_TILE=dict(BLOCK_T=t, BLOCK_D=d, num_warps=4)) for t, d in ((32, 128), (16, 128),
                                                                                (64, 64))]
         + [dict(TARGET_PROGRAMS=n) for n in (256, 512, 1024)]
         + [dict(FINISH_TILE=dict(BLOCK_R=r, BLOCK=16, num_warps=1)) for r in (8, 16)]
         + [{kind: t} for kind, tiles in (("normalise", ((1024, 4), (2048, 4), (4096, 4))),
                                          ("reduce", ((512, 2), (1024, 2), (1024, 4), (2048, 4))),
                                          ("apply", ((1024, 4), (2048, 4), (2048, 8))))
            for t in tiles])


def configure(settings: dict) -> dict:   # -> the previous values
    old = {name: qnt.TILES[name] if name in qnt.TILES else getattr(qnt, name) for name in settings}
    for name, value in settings.items():
        if name in qnt.TILES:
            qnt.TILES[name] = value
        else:
            setattr(qnt, name, value)
    return old


def setup(T: int, H: int, half: int):
    """-> (q with a shared offset, dout head-major as the search's backward gives it, keep, bn, gain)"""
    D = H * 2 * half
    gen = torch.Generator(device=device()).manual_seed(0)
    q = (torch.randn(T, D, generator=gen, device=device()) + 3).to(torch.bfloat16).requires_grad_()
    dout = torch.randn(H, 2, T, half, generator=gen, device=device()).permute(2, 0, 1, 3)
    keep = (torch.rand(T, generator=gen, device=device()) > 0.05).float()
    bn = QueryBatchNorm(D, QueryNorm.BATCHNORM, 1e-5, 0.1, device=device(), dtype=torch.bfloat16).train()
    gain = torch.nn.Parameter(torch.ones(D, device=device(), dtype=torch.bfloat16))
    for p in (bn.weight, bn.bias, gain):
        p.data += torch.randn(D, generator=gen, device=device()).to(p.dtype) * 0.1
    return q, dout, keep, bn, gain


def paths(q, keep, bn, gain, half, qk_eps=1e-6):
    T = q.shape[0]

    def torch_path():
        y = bn(q, keep).view(T, -1, 2, half)
        return F.rms_norm(y, (half,), eps=qk_eps) * gain.float().view(-1, 2, half)

    def fused():
        return qnt.query_norm_train(q, bn.weight, bn.bias, gain, bn.eps, qk_eps, half,
                                    bn.step_sums, keep)
    return {"torch": torch_path, "fused": fused}


def steps(name: str, T: int, H: int, half: int):
    q, dout, keep, bn, gain = setup(T, H, half)   # -> (forward, forward+backward) on fresh inputs
    fn, params = paths(q, keep, bn, gain, half)[name], [q, bn.weight, bn.bias, gain]
    return fn, lambda: torch.autograd.grad(fn(), params, dout)


def timed(name: str, shape: tuple, rep_ms: int, graph: bool):
    """(forward ms, forward+backward ms), eager or as CUDA graphs (inputs, autograd nodes and
    capture on one side stream, as capturing a backward needs)."""
    if not (graph and torch.cuda.is_available()):
        return tuple(bench_ms(f, rep_ms) for f in steps(name, *shape))
    stream, graphs = torch.cuda.Stream(), []
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in steps(name, *shape):
            for _ in range(3):
                f()
            graphs.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graphs[-1], stream=stream):
                f()
    torch.cuda.current_stream().wait_stream(stream)
    return tuple(bench_ms(g.replay, rep_ms) for g in graphs)


def sweep(shape, rep_ms) -> list:
    rows = []
    for settings in SWEEP:
        old = configure(settings)
        ms = timed("fused", shape, rep_ms, graph=True)
        configure(old)
        rows.append([settings, "default" if old == settings else "", *(f"{t:.4f}" for t in ms)])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--tokens", 8192), ("--heads", 4), ("--half", 256)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench rep time per measurement")
    ap.add_argument("--sweep", action="store_true", help="also time other launch settings")
    ap.add_argument("--append", action="store_true", help="append to benchmarks/RESULTS.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check)")
    args = ap.parse_args(argv)
    T, H, half = (12, 2, 5) if args.smoke else (args.tokens, args.heads, args.half)
    if args.smoke:  # numpy >= 2.5 vs Triton 3.6's interpreter
        from tests.kernels.test_embedding_bag import install_interpreter_shim
        install_interpreter_shim()
    outs = {}
    for name in ("fused", "torch"):
        fwd, both = steps(name, T, H, half)
        outs[name] = [fwd().detach(), *both()]
    errs = [((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()
            for a, b in zip(outs["fused"], outs["torch"])]
    D = H * 2 * half
    floor = (T * D * 6, T * D * 14)           # bytes (bf16 q): forward, forward+backward
    rows = []
    for graph in (False, True) if torch.cuda.is_available() else (False,):
        ms = {name: timed(name, (T, H, half), args.rep_ms, graph) for name in outs}
        for i, what in enumerate(("forward", "forward+backward")):
            t, f = ms["torch"][i], ms["fused"][i]
            rows.append([what, "CUDA graph (GPU time)" if graph else "eager", f"{t:.3f}",
                         f"{f:.3f}", f"{floor[i] / f / 1e6:.0f}", f"{t / f:.2f}x"])
    text = env_header(f"Query BatchNorm + QK-norm, training: T={T}, D={D} (H={H}, half={half})")
    text += ("\nRelative difference fused vs torch (out, dq, dweight, dbias, dgain): "
             + ", ".join(f"{x:.1e}" for x in errs) + "\n\n")
    text += md_table(["pass", "timing", "torch ms", "fused ms", "fused GB/s of the byte floor",
                      "speed-up"], rows)
    if args.sweep:
        text += "\n" + md_table(["settings", "", "fused fwd ms (graph)",
                                 "fused fwd+bwd ms (graph)"], sweep((T, H, half), args.rep_ms))
    emit("bench_query_norm", text, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
