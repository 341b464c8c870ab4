# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Where a profiled training step's GPU time goes: kernel time by kind, and how much of the
step's wall time the GPU was busy at all.

The per-kernel table (``training._log_profile``) lists the 40 largest kernels; it cannot say
whether a step is bound by the GPU or by the host (Python, kernel launches, waits), which is the
question at micro-batch 1 where a 2048-token micro-batch does not fill a Hopper card. This
summary adds: busy time (the union of kernel intervals on every stream, so overlapped
communication is counted once), idle = wall - busy, and the kernel time of each kind:
memory-layer Triton kernels (by the names of this package's ``@triton.jit`` functions), GEMMs,
attention, NCCL, the optimizer's multi-tensor kernels, and the rest (elementwise, reductions,
copies).
"""
from __future__ import annotations

import re
import types
from typing import Iterable

from megatron_memory import kernels

# Kinds by kernel name, first match wins; "memory" is matched by name set, before these.
_KINDS = (
    ("NCCL", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|attention|attn", re.I)),
    ("GEMM", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|^sm\d+_", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
)
MEMORY = "memory (Triton)"
OTHER = "other (elementwise, reductions, copies)"


def triton_kernel_names() -> frozenset[str]:
    """Names of this package's Triton kernels (the profiler names a Triton kernel after its
    function); empty without Triton."""
    if not kernels.HAVE_TRITON:
        return frozenset()
    import triton  # importable: HAVE_TRITON (an optional dependency at module import)

    mods = [m for m in vars(kernels).values() if isinstance(m, types.ModuleType)
            and m.__name__.startswith(kernels.__name__ + ".")]
    return frozenset(n for m in mods for n, obj in vars(m).items()
                     if isinstance(obj, triton.runtime.JITFunction))


def kind_of(name: str, memory_names: frozenset[str]) -> str:
    if name in memory_names:
        return MEMORY
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return OTHER


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize(kernels: list[tuple[str, float, float]], wall_s: float,
              memory_names: frozenset[str]) -> dict:
    """kernels: (name, start_us, end_us) of every GPU kernel of the step -> {"wall_ms",
    "busy_ms", "idle_ms", "kinds": {kind: (ms, launches)}} (kinds sorted by time)."""
    kinds: dict[str, list] = {}
    for name, s, e in kernels:
        acc = kinds.setdefault(kind_of(name, memory_names), [0.0, 0])
        acc[0] += (e - s) / 1e3
        acc[1] += 1
    busy = busy_us((s, e) for _, s, e in kernels) / 1e3
    wall = wall_s * 1e3
    ordered = dict(sorted(((k, (v[0], v[1])) for k, v in kinds.items()), key=lambda kv: -kv[1][0]))
    return {"wall_ms": wall, "busy_ms": busy, "idle_ms": max(0.0, wall - busy), "kinds": ordered}


def format_summary(s: dict) -> str:
    wall = s["wall_ms"] or float("nan")
    lines = [f"GPU busy {s['busy_ms']:.1f} ms of a {s['wall_ms']:.1f} ms step "
             f"({s['busy_ms'] / wall:.0%}; idle {s['idle_ms']:.1f} ms: host-bound or waiting)",
             "kernel time by kind (streams may overlap, so the sum can exceed busy):"]
    for kind, (ms, count) in s["kinds"].items():
        lines.append(f"  {kind:<42} {ms:9.1f} ms  {count:6d} kernels  {ms / wall:6.1%} of the step")
    return "\n".join(lines)


def device_kernels(prof) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of the GPU kernels a torch profiler recorded.

    Kineto also puts every ``record_function`` range that ran GPU work on the GPU timeline
    ("gpu_user_annotation": ``Optimizer.step#AdamW.step``, c10d's ``nccl:all_reduce``), with
    device type CUDA and a span covering its kernels. Those are left out: counted as kernels
    they doubled the optimizer and NCCL kinds (an optimizer step's AdamW kernels counted once
    more as their annotation)."""
    from torch.autograd import DeviceType  # only when a profile is summarised

    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
