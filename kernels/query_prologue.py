# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The memory query's inference prologue in one Triton kernel: running-statistics normalisation
(query BatchNorm or centring), per-half RMS norm (QK-norm) and its gain.

Shapes: q [T, H*2*half] (the query projection's output, bf16/fp16/fp32) -> [T, H, 2, half] fp32:
    x = q - mean                        (centring and batchnorm)
    x = x * scale + shift               (batchnorm: scale = weight / sqrt(running_var + eps))
    x = x * rsqrt(mean(x**2 over half) + eps_qk) * gain
mean, scale, shift, gain: fp32 [H*2*half]. The torch ops it replaces are those of
``megatron_memory/export/standalone.py`` ``Memory.forward`` (its test compares the two).

Why: in a batch-1 decode step these are six elementwise kernels of ~2 us each (cast, sub, mul,
add, rms_norm, gain) on 2048 numbers per memory layer; one launch does the same work. No autograd:
the standalone model calls it only when no gradient must reach the query.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

NORMS = {"none": 0, "center": 1, "batchnorm": 2}


@triton.jit
def _prologue_kernel(q, mean, scale, shift, gain, out, half, width, eps, stride_q,
                     NORM: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token t, half-row r = h*2 + c): columns r*half .. r*half + half - 1."""
    t = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, BLOCK)
    m = cs < half
    cols = tl.program_id(1) * half + cs
    x = tl.load(q + t * stride_q + cols, mask=m, other=0.0).to(tl.float32)
    if NORM >= 1:
        x = x - tl.load(mean + cols, mask=m, other=0.0)
    if NORM == 2:
        x = x * tl.load(scale + cols, mask=m, other=0.0) + tl.load(shift + cols, mask=m, other=0.0)
    x = tl.where(m, x, 0.0)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / half + eps)   # rsqrtf, as torch's CUDA rms_norm
    y = x * inv * tl.load(gain + cols, mask=m, other=0.0)
    tl.store(out + t * width + cols, y, mask=m)


def triton_query_prologue(q: torch.Tensor, gain: torch.Tensor, eps: float, half: int, norm: str = "none",
                          mean: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                          shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [T, H*2*half] -> [T, H, 2, half] fp32 (module docstring). norm: "none" | "center"
    (needs mean) | "batchnorm" (needs mean, scale, shift); every vector fp32 [H*2*half]."""
    if norm not in NORMS:
        raise ValueError(f"query_prologue: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if q.dim() != 2 or half < 1 or q.shape[1] % (2 * half):
        raise ValueError(f"query_prologue: q must be [T, H*2*half] with half={half}, got {tuple(q.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"query_prologue: q must be bf16, fp16 or fp32, got {q.dtype}")
    width = q.shape[1]
    needed = {"none": (gain,), "center": (gain, mean), "batchnorm": (gain, mean, scale, shift)}[norm]
    for v in needed:
        if v is None or v.shape != (width,) or v.dtype != torch.float32 or v.device != q.device:
            got = None if v is None else (v.dtype, tuple(v.shape), str(v.device))
            raise ValueError(f"query_prologue: norm={norm!r} needs fp32 [{width}] vectors on "
                             f"{q.device} (gain, then mean, scale, shift as used), got {got}")
    q = q if q.stride(1) == 1 else q.contiguous()
    T = q.shape[0]
    out = torch.empty(T, width // (2 * half), 2, half, dtype=torch.float32, device=q.device)
    if T == 0:
        return out
    dummy = gain  # unused pointer arguments of the modes that skip them
    _prologue_kernel[(T, width // half)](
        q, mean if mean is not None else dummy, scale if scale is not None else dummy,
        shift if shift is not None else dummy, gain, out, half, width, float(eps), q.stride(0),
        NORM=NORMS[norm], BLOCK=triton.next_power_of_2(half), num_warps=4 if half > 512 else 1)
    return out
