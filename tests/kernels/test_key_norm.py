# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The keys' fused QK-norm (kernels/key_norm.py) against torch: kn = rms_norm(keys) / sqrt(half)
and its bf16 copy, and the keys' gradient against float64 autograd; odd shapes, bf16 / fp32
keys, several row blocks, a zero row (r = eps^-1/2). CPU cases run in the Triton interpreter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_memory import kernels
from tests.conftest import requires_cuda
from tests.kernels.test_embedding_bag import rel_err, run_interpreted, sm90_compile

from megatron_memory.kernels import key_norm as kn_mod

EPS = 1e-6
CASES = [dict(H=3, n=37, half=24, dtype=torch.float32),
         dict(H=2, n=5, half=256, dtype=torch.bfloat16),
         dict(H=1, n=3, half=7, dtype=torch.float32)]


def torch_form(keys: torch.Tensor) -> torch.Tensor:
    half = keys.shape[-1]
    return F.rms_norm(keys, (half,), eps=EPS) * half ** -0.5


def check(H, n, half, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(H, 2, n, half, generator=gen).to(dtype)
    keys[0, 1, 0] = 0                                  # a zero row: finite, gradient s * r * dy
    dy = torch.randn(H, 2, n, half, generator=gen)
    ref = keys.double().requires_grad_()
    want = torch_form(ref)
    want.backward(dy.double())
    kt = keys.to(device).requires_grad_()
    got, got_b = kn_mod.key_norm(kt, EPS)
    assert got.dtype == torch.float32 and got_b.dtype == torch.bfloat16 and got.shape == keys.shape
    assert not got.isnan().any()
    torch.testing.assert_close(got.cpu().double(), want.detach(), rtol=1e-6, atol=1e-6)
    if device == "cuda":   # round to nearest even, as torch's cast
        assert torch.equal(got_b, got.to(torch.bfloat16))
    else:                  # the interpreter's cast may round otherwise: one bf16 step at most
        assert torch.all((got_b.double() - got.double()).abs() <= got.double().abs() * 2 ** -7)
    got.backward(dy.to(device))
    assert kt.grad.dtype == dtype
    err = rel_err(kt.grad, ref.grad)
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2), err


def interpreter_cases():
    for i, case in enumerate(CASES):
        check(**case, seed=i)
    return len(CASES)


def test_interpreter_matches_torch_and_float64_autograd():
    assert run_interpreted("tests.kernels.test_key_norm", "interpreter_cases",
                           timeout=300) == len(CASES)


def test_rejects_what_it_cannot_serve():
    with pytest.raises(ValueError, match="must be one of"):
        kn_mod.key_norm(torch.ones(2, 4, dtype=torch.float64), EPS)
    with pytest.raises(ValueError, match="half"):
        kn_mod.key_norm(torch.ones(2, 2048), EPS)
    assert kernels.fused_key_norm(torch.ones(2, 4), EPS) is None      # CPU tensors: torch path


def test_sm90_compile_without_spills():
    for fn, ptrs in ((kn_mod._key_norm_fwd, dict(keys="bf16", kn="fp32", kb="bf16")),
                     (kn_mod._key_norm_bwd, dict(keys="bf16", dy="fp32", dx="bf16"))):
        regs, spills = sm90_compile(fn, ptrs, dict(BLOCK_R=kn_mod.BLOCK_ROWS, BLOCK_D=256), 4,
                                    scalars=dict(eps="fp32", scale="fp32"))
        assert spills == 0, f"{fn.__name__}: {regs} registers, {spills} B spilled"


@requires_cuda
@pytest.mark.parametrize("case", CASES + [dict(H=4, n=1024, half=256, dtype=torch.bfloat16)])
def test_gpu_matches_torch(case):
    check(**case, device="cuda")
