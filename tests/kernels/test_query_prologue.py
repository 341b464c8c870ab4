# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The fused query prologue (running-statistics norm, QK-norm, gain) against the same math in
float64 torch, in every norm mode, at odd widths, bf16 input and a strided query. CPU cases run
the kernel in the Triton interpreter; the standalone model's use of it is tested on GPU in
tests/export/test_standalone_gpu.py."""
from __future__ import annotations

import pytest
import torch

from megatron_memory.kernels import query_prologue as qp
from tests.kernels.test_embedding_bag import run_interpreted, sm90_compile


def reference(q, gain, eps, half, norm, mean, scale, shift):
    """float64: (q - mean) [* scale + shift], then x / sqrt(mean(x^2 over half) + eps) * gain."""
    x = q.double()
    if norm != "none":
        x = x - mean.double()
    if norm == "batchnorm":
        x = x * scale.double() + shift.double()
    x = x.reshape(q.shape[0], q.shape[1] // (2 * half), 2, half)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * gain.double().view(-1, 2, half)


CASES = [
    dict(T=3, H=2, half=16, norm="batchnorm"),
    dict(T=1, H=4, half=24, norm="batchnorm", dtype=torch.bfloat16),  # a decode step, bf16
    dict(T=5, H=1, half=5, norm="center"),                             # half not a power of 2
    dict(T=2, H=3, half=8, norm="none", strided=True),
    dict(T=0, H=2, half=8, norm="batchnorm"),
]


def check(T, H, half, norm, dtype=torch.float32, strided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = H * 2 * half
    q = (torch.randn(T, 2 * width if strided else width, generator=gen) * 3 + 1).to(dtype)
    q = q[:, ::2] if strided else q                                  # column stride 2
    mean, shift = torch.randn(width, generator=gen), torch.randn(width, generator=gen)
    scale, gain = torch.rand(width, generator=gen) + 0.5, torch.rand(width, generator=gen) + 0.5
    got = qp.triton_query_prologue(q, gain, 1e-6, half, norm, mean, scale, shift)
    assert got.dtype == torch.float32 and got.shape == (T, H, 2, half)
    want = reference(q, gain, 1e-6, half, norm, mean, scale, shift)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def interpreter_cases():
    for i, case in enumerate(CASES):
        check(**case, seed=i)
    return len(CASES)


def test_interpreter_matches_float64():
    assert run_interpreted("tests.kernels.test_query_prologue", "interpreter_cases") == len(CASES)


@pytest.mark.parametrize("half,warps", [(256, 1), (1024, 4)])
def test_sm90_compile_without_spills(half, warps):
    regs, spills = sm90_compile(qp._prologue_kernel, dict(
        q="bf16", mean="fp32", scale="fp32", shift="fp32", gain="fp32", out="fp32"),
        dict(NORM=2, BLOCK=half), warps)
    assert spills == 0, f"{regs} registers, {spills} B spilled"


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="layernorm"), "norm must be one of"),
    (dict(half=5), r"q must be \[T, H\*2\*half\]"),
    (dict(norm="center", mean=None), "needs fp32 \\[16\\] vectors"),
    (dict(norm="batchnorm", shift=torch.zeros(8)), "needs fp32 \\[16\\] vectors"),
    (dict(q=torch.zeros(2, 16, dtype=torch.int64)), "bf16, fp16 or fp32"),
])
def test_bad_input_is_one_clear_error(kwargs, match):
    args = dict(q=torch.zeros(2, 16), gain=torch.ones(16), eps=1e-6, half=4, norm="batchnorm",
                mean=torch.zeros(16), scale=torch.ones(16), shift=torch.zeros(16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        qp.triton_query_prologue(**args)
