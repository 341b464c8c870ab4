# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The torch references of both ops against independent formulations, and the dispatch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_memory import kernels
from megatron_memory.kernels.reference import embedding_bag_reference, product_key_search_reference


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,bag,N,d", [(1, 1, 1, 1), (37, 16, 101, 13), (64, 128, 1000, 64)])
def test_embedding_bag_matches_torch_embedding_bag(T, bag, N, d, index_dtype):
    g = torch.Generator().manual_seed(T * 1000 + d)
    values = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, N, (T, bag), generator=g)
    idx[:, : bag // 2] = idx[:, :1]  # duplicate indices inside a bag
    w = torch.rand(T, bag, generator=g, dtype=torch.float64, requires_grad=True)
    out = embedding_bag_reference(values, idx.to(index_dtype), w)
    ref = F.embedding_bag(idx, values, per_sample_weights=w, mode="sum")
    torch.testing.assert_close(out, ref)
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [values, w], g_out)
    want = torch.autograd.grad(ref, [values, w], g_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_embedding_bag_table_gradient_does_not_depend_on_threads():
    """The table gradient on a multi-threaded CPU equals the one-thread gradient, every time
    (issue 30: advanced indexing's gradient added rows with atomics in thread order, and two
    same-seed runs drifted apart)."""
    g = torch.Generator().manual_seed(30)
    values = torch.randn(4, 64, generator=g, requires_grad=True)  # 4 hot rows: many collisions
    idx = torch.randint(0, 4, (2048, 16), generator=g)
    w = torch.rand(2048, 16, generator=g)
    g_out = torch.randn(2048, 64, generator=g)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 2, 2, 2, 2):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(embedding_bag_reference(values, idx, w), values, g_out)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, grads[0]) for x in grads[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_embedding_bag_low_precision_accumulates_in_fp32(dtype):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(50, 24, generator=g).to(dtype)
    idx = torch.randint(0, 50, (9, 128), generator=g)
    w = torch.rand(9, 128, generator=g)
    out = embedding_bag_reference(values, idx, w)
    assert out.dtype == dtype
    exact = torch.einsum("tb,tbd->td", w.double(), values.double()[idx])
    err = (out.double() - exact).norm() / exact.norm()
    assert err < {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-6}[dtype]


@pytest.mark.parametrize("T,H,n,half,k", [(7, 3, 11, 5, 4), (20, 2, 32, 8, 32), (3, 1, 2, 1, 1)])
def test_product_key_search_is_exact_against_brute_force(T, H, n, half, k):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(T, H, 2, half, generator=g, dtype=torch.float64)
    keys = torch.randn(H, 2, n, half, generator=g, dtype=torch.float64)
    scores, idx = product_key_search_reference(q, keys, k)
    s1 = torch.einsum("thd,hnd->thn", q[:, :, 0], keys[:, 0])
    s2 = torch.einsum("thd,hnd->thn", q[:, :, 1], keys[:, 1])
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)           # [T, H, n*n]
    want_s, want_i = full.topk(k, dim=-1)
    torch.testing.assert_close(scores, want_s)
    assert torch.equal(idx, want_i)
    assert scores.dtype == torch.float64 and idx.dtype == torch.int64


def test_dispatch_uses_reference_on_cpu_and_can_be_forced():
    v = torch.randn(10, 4)
    idx = torch.randint(0, 10, (3, 5))
    w = torch.rand(3, 5)
    assert not kernels.use_triton(v)
    kernels.force_reference(True)
    try:
        torch.testing.assert_close(kernels.embedding_bag(v, idx, w), embedding_bag_reference(v, idx, w))
    finally:
        kernels.force_reference(False)
