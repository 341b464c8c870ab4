# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""QK-norm of the product keys as one op, for training.

keys [H, 2, n, half] (the parameter, bf16 or fp32) -> kn = rms_norm(keys) * half**-0.5 in fp32
(the search's exact re-scoring input) and kb = kn in bf16 (its tensor-core GEMM input), one
Triton kernel forward and one backward. The torch form (cast, rms_norm, scale, then the
search's bf16 cast; in the backward the scale, rms_norm and cast backwards) dispatches four ops
each way. The keys are small (2^21 values at the paper's sizes), so the time here is host
launches: with micro-batch 1 a training step is host-bound (see benchmarks/RESULTS.md).

Forward per row: r = (mean(x^2) + eps)^-1/2, y = s * x * r. Backward, from dy:
dx = s * r * (dy - x_hat * mean(dy * x_hat)), x_hat = x * r (r recomputed from the keys).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_ROWS = 8   # rows per program
MAX_HALF = 1024  # a row is one block of columns in registers (the layer's half is 256)


@triton.jit
def _rows(keys, R, half, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows of keys as fp32, their offsets and mask, and r per row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < half)[None, :]
    offs = rows.to(tl.int64)[:, None] * half + cols[None, :]
    x = tl.load(keys + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / half + eps)
    return x, offs, mask, r


@triton.jit
def _key_norm_fwd(keys, kn, kb, R, half, eps, scale, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    x, offs, mask, r = _rows(keys, R, half, eps, BLOCK_R, BLOCK_D)
    y = x * (r * scale)[:, None]
    tl.store(kn + offs, y, mask=mask)
    tl.store(kb + offs, y.to(tl.bfloat16), mask=mask)


@triton.jit
def _key_norm_bwd(keys, dy, dx, R, half, eps, scale, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    x, offs, mask, r = _rows(keys, R, half, eps, BLOCK_R, BLOCK_D)
    g = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
    xh = x * r[:, None]
    d = (g - xh * (tl.sum(g * xh, axis=1) / half)[:, None]) * (r * scale)[:, None]
    tl.store(dx + offs, d.to(dx.dtype.element_ty), mask=mask)


def _grid(R: int):
    return (triton.cdiv(R, BLOCK_ROWS),)


class _KeyNorm(torch.autograd.Function):
    """forward(keys, eps) -> (kn fp32, kb bf16, same shape); the gradient reaches keys via kn."""

    @staticmethod
    def forward(ctx, keys, eps):
        half = keys.shape[-1]
        R = keys.numel() // half
        kn = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
        kb = torch.empty(keys.shape, dtype=torch.bfloat16, device=keys.device)
        if R:
            _key_norm_fwd[_grid(R)](keys, kn, kb, R, half, eps, half ** -0.5, BLOCK_R=BLOCK_ROWS,
                                    BLOCK_D=triton.next_power_of_2(half))
        ctx.save_for_backward(keys)
        ctx.eps = eps
        ctx.mark_non_differentiable(kb)
        return kn, kb

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dkn, _dkb):
        (keys,) = ctx.saved_tensors
        half = keys.shape[-1]
        R = keys.numel() // half
        dkeys = torch.empty_like(keys)   # dkn: zeros when kn went unused (materialised grads)
        if R:
            _key_norm_bwd[_grid(R)](keys, dkn.contiguous(), dkeys, R, half, ctx.eps, half ** -0.5,
                                    BLOCK_R=BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(half))
        return dkeys, None


def key_norm(keys: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., half] (float32 / bfloat16 / float16) -> (kn fp32, kb bf16) = the QK-normed keys
    scaled by half**-0.5 and their bf16 copy; differentiable through kn."""
    if keys.dtype not in DTYPES:
        raise ValueError(f"key_norm: keys must be one of {DTYPES}, got {keys.dtype}")
    if not 1 <= keys.shape[-1] <= MAX_HALF:
        raise ValueError(f"key_norm: the last dim (half) must be in [1, {MAX_HALF}], "
                         f"got {keys.shape[-1]}")
    return _KeyNorm.apply(keys.contiguous(), float(eps))
