# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The decode-step search (exact fp32, sub-keys split across programs) against the fp32
reference: the same sets and scores at odd sizes (n not a multiple of the chunk, k not a power
of two, one chunk, k = n), bf16 inputs; the dispatcher takes it only for few tokens without
gradients. CPU cases run the kernels in the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

from megatron_memory import kernels
from megatron_memory.kernels import decode_search as ds
from megatron_memory.kernels.reference import product_key_search_reference
from tests.conftest import requires_cuda
from tests.kernels.test_bf16_search import layer_like
from tests.kernels.test_embedding_bag import run_interpreted, sm90_compile


def check(device, T, H, n, half, k, dtype=torch.float32, seed=0):
    q, K = layer_like(T, H, n, half, seed)
    q, K = q.to(dtype), K.to(dtype)
    want_s, want_i = product_key_search_reference(q.float(), K.float(), k)
    with torch.no_grad():
        s, i = ds.decode_product_key_search(q.to(device), K.to(device), k)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (T, H, k)
    assert torch.all(s[..., :-1] >= s[..., 1:]), "scores not descending"
    assert torch.equal(i.cpu().sort(-1).values, want_i.sort(-1).values), "another set"
    torch.testing.assert_close(s.cpu(), want_s, rtol=0, atol=1e-5)


CASES = [
    dict(T=1, H=2, n=100, half=80, k=7),     # 4 chunks, the last partial; 2 column blocks
    dict(T=3, H=3, n=37, half=24, k=5),
    dict(T=2, H=1, n=6, half=4, k=6),        # k = n, one chunk
    dict(T=4, H=2, n=64, half=16, k=32, dtype=torch.bfloat16),
]


def interpreter_cases():
    for i, case in enumerate(CASES):
        check("cpu", **case, seed=i)
    return len(CASES)


def test_interpreter_matches_reference():
    assert run_interpreted("tests.kernels.test_decode_search", "interpreter_cases") == len(CASES)


def test_sm90_compile_without_spills():
    cfg = ds.decode_config(256, 32)
    regs, spills = sm90_compile(ds._chunk_topk_kernel, dict(q="fp32", keys="fp32", part="i64"), dict(
        K_PAD=32, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"]), cfg["num_warps"])
    assert spills == 0, f"chunk top-k: {regs} registers, {spills} B spilled"
    regs, spills = sm90_compile(ds._merge_kernel, dict(part="i64", top_s="fp32", top_i="i32"),
                                dict(K_PAD=32, BLOCK_C=32), 4)
    assert spills == 0, f"merge: {regs} registers, {spills} B spilled"


def test_refuses_gradients():
    q, K = layer_like(1, 1, 8, 4, 0)
    with pytest.raises(ValueError, match="no backward"):
        ds.decode_product_key_search(q.requires_grad_(), K, 2)


@requires_cuda
@pytest.mark.parametrize("T", [1, 5, 16])
def test_gpu_matches_reference_at_layer_sizes(T):
    check("cuda", T, 4, 1024, 256, 32, seed=T)


@requires_cuda
def test_gpu_dispatch_takes_it_for_decode_steps(monkeypatch):
    seen = []
    real = ds.decode_product_key_search
    monkeypatch.setattr(ds, "decode_product_key_search", lambda *a: seen.append(a[0].shape[0]) or real(*a))
    q, K = layer_like(ds.MAX_TOKENS + 1, 2, 64, 16, 3)
    q, K = q.cuda(), K.cuda()
    with torch.no_grad():
        kernels.product_key_search(q[:1], K, 4)
        kernels.product_key_search(q, K, 4)              # more tokens: the bf16 search
    kernels.product_key_search(q[:1].requires_grad_(), K, 4)   # a gradient: the bf16 search
    assert seen == [1]
