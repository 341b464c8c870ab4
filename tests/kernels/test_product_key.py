# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Triton product-key search against the fp64 reference: selected sets, scores, dq and dK.

The selected set per (t, h) must be a valid top-k and, on random inputs, the reference's set
(see ``check_search`` for near-ties). GPU cases use ``requires_cuda``; tiny cases run on CPU
under Triton's interpreter.
"""
from __future__ import annotations


import pytest
import torch
import triton

from megatron_memory import kernels
from megatron_memory.kernels.reference import product_key_search_reference
from tests.conftest import requires_cuda
from tests.kernels.test_embedding_bag import TOL, rel_err, run_interpreted, sm90_compile

from megatron_memory.kernels import triton_product_key as pk


def scores_at(q: torch.Tensor, K: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """s1[i] + s2[j] of the given indices i*n + j: q [T, H, 2, half], K [H, 2, n, half] -> [T, H, k]."""
    n = K.shape[2]
    s1 = torch.einsum("thd,hnd->thn", q[:, :, 0], K[:, 0])
    s2 = torch.einsum("thd,hnd->thn", q[:, :, 1], K[:, 1])
    return s1.gather(-1, idx // n) + s2.gather(-1, idx % n)


def check_search(device, T, H, n, half, k, dtype=torch.float32, seed=0, key_scale=1.0):
    """Forward and both gradients vs fp64 on the same dtype-quantised inputs.

    The selected set must be a valid top-k: k distinct indices whose exact (fp64) scores are all
    >= the exact k-th best minus a rounding tolerance. On random inputs that is the reference's
    set except in the rare row whose k-th and (k+1)-th best differ by less than fp32 rounding
    (frequent enough at T*H*n*n ~ 1e9 candidates to make exact set equality flaky). Scores must
    equal the exact scores of the chosen indices; gradients must equal the fp64 gradients of
    those scores (the op's backward given its selection).
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 2, half, generator=gen, dtype=torch.float64).to(dtype)
    K = (torch.randn(H, 2, n, half, generator=gen, dtype=torch.float64) * key_scale).to(dtype)
    dscores = torch.randn(T, H, k, generator=gen, dtype=torch.float64)
    want_s, want_i = product_key_search_reference(q.double(), K.double(), k)
    tol = 2e-5 * max(1.0, want_s.abs().max().item())

    qt, Kt = q.to(device, copy=True).requires_grad_(), K.to(device, copy=True).requires_grad_()
    scores, idx = pk.triton_product_key_search(qt, Kt, k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert scores.shape == idx.shape == (T, H, k)
    assert not idx.requires_grad
    assert torch.all(scores[..., :-1] >= scores[..., 1:]), "scores not descending"
    got_i = idx.cpu()
    assert got_i.min() >= 0 and got_i.max() < n * n
    assert torch.all(got_i.sort(-1).values.diff(dim=-1) > 0), "an index selected twice"
    qr, Kr = q.double().requires_grad_(), K.double().requires_grad_()
    exact = scores_at(qr, Kr, got_i)
    torch.testing.assert_close(scores.cpu().double(), exact.detach(), rtol=0, atol=tol)
    assert torch.all(exact.detach().min(-1).values >= want_s[..., -1] - tol), "not a top-k set"
    same = (got_i.sort(-1).values == want_i.sort(-1).values).all(-1).float().mean().item()
    assert same >= 0.99, f"only {same:.3f} of the rows select the reference's set"
    torch.testing.assert_close(scores.cpu().double(), want_s, rtol=0, atol=tol)

    scores.backward(dscores.float().to(device))
    exact.backward(dscores)
    gtol = max(TOL[dtype], 1e-5)
    assert qt.grad.dtype == dtype and Kt.grad.dtype == dtype
    assert rel_err(qt.grad, qr.grad) <= gtol, rel_err(qt.grad, qr.grad)
    assert rel_err(Kt.grad, Kr.grad) <= gtol, rel_err(Kt.grad, Kr.grad)


# ------------------------------------------------------------------------------------------
# CPU: interpreter, validation, dispatch
# ------------------------------------------------------------------------------------------

INTERPRETER_CASES = [
    dict(T=5, H=3, n=11, half=5, k=4),                      # odd sizes, k not a power of two
    dict(T=3, H=1, n=2, half=1, k=1),                       # smallest everything
    dict(T=17, H=2, n=70, half=20, k=5),                    # several token/key/width blocks
    dict(T=4, H=2, n=5, half=8, k=5),                       # k == n_keys: padded running lists
    dict(T=6, H=2, n=40, half=16, k=8, dtype=torch.bfloat16),
    dict(T=129, H=2, n=40, half=8, k=6),                    # > SMALL_ROWS rows: 16-row programs
]


def interpreter_search_cases():
    for case in INTERPRETER_CASES:
        check_search("cpu", **case)
    q, K = torch.randn(3, 2, 2, 4, dtype=torch.float64), torch.randn(2, 2, 6, 4, dtype=torch.float64)
    s, i = pk.triton_product_key_search(q, K, 3)            # fp64: the reference
    torch.testing.assert_close(s, product_key_search_reference(q, K, 3)[0])
    return len(INTERPRETER_CASES)


def test_interpreter_product_key_search():
    assert run_interpreted("tests.kernels.test_product_key", "interpreter_search_cases") \
        == len(INTERPRETER_CASES)


@pytest.mark.parametrize("dtype,precision,k,half", [
    ("fp32", "ieee", 32, 256), ("fp32", "tf32x3", 32, 256), ("bf16", None, 32, 256),
    ("fp32", "ieee", 128, 256), ("fp16", None, 1, 1)])
def test_sm90_compile_without_spills(dtype, precision, k, half):
    """Both search kernels compile for H100 (layer shapes: k=32, half=256) without spills."""
    k_pad = max(2, triton.next_power_of_2(k))
    cfg = pk.search_config(half, k_pad)
    tiles = {key: v for key, v in cfg.items() if key != "num_warps"}
    ptrs = dict(q=dtype, keys=dtype, top_s="fp32", top_i="i32", pair_a="i32", pair_b="i32",
                scores="fp32", indices="i64", ranks="i32")
    regs, spills = sm90_compile(pk._half_topk_kernel, ptrs, dict(
        tiles, K_PAD=k_pad, PRECISION=precision, UPCAST=False), cfg["num_warps"])
    assert spills <= (16 if k == 1 else 0), f"half_topk: {regs} registers, {spills} B spilled"
    P = pk._pairs(k, k_pad, torch.device("cpu"))[2]
    regs, spills = sm90_compile(pk._candidates_kernel, ptrs, dict(
        K_PAD=k_pad, P=P, BLOCK_R=pk.candidates_block(P), WRITE_RANKS=False), 4)
    assert spills == 0, f"candidates: {regs} registers, {spills} B spilled"


def _good():
    return torch.randn(4, 2, 2, 8), torch.randn(2, 2, 16, 8)


@pytest.mark.parametrize("mutate,match", [
    (lambda q, K, k: (q[:, :, :1], K, k), "query must be"),
    (lambda q, K, k: (q, K[:, :1], k), "keys must be"),
    (lambda q, K, k: (q, K[:1], k), "do not match"),
    (lambda q, K, k: (q, K[..., :4], k), "do not match"),
    (lambda q, K, k: (q, K, 17), "k must be"),
    (lambda q, K, k: (q, K, 0), "k must be"),
    (lambda q, K, k: (q, K, 2.0), "k must be"),
    (lambda q, K, k: (q.to(torch.int32), K, k), "query dtype"),
    (lambda q, K, k: (q, K, k), "CUDA tensors"),
])
def test_bad_inputs_raise_value_error(mutate, match):
    q, K = _good()
    with pytest.raises(ValueError, match=match):
        pk.triton_product_key_search(*mutate(q, K, 4))


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(pk, "triton_product_key_search", lambda *a: pytest.fail("Triton on CPU"))
    q, K = _good()
    got = kernels.product_key_search(q, K, 4)
    want = product_key_search_reference(q, K, 4)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------

GPU_SHAPES = [
    (1, 1, 2, 1, 1), (7, 3, 11, 5, 4), (33, 2, 64, 16, 8), (100, 3, 37, 24, 37),
    (256, 4, 128, 64, 32), (64, 4, 1024, 256, 32), (50, 2, 300, 32, 33), (129, 1, 256, 128, 128),
]


# fp32 on every shape; the 16-bit dtypes (tensor-core dots) on every other one.
GPU_CASES = ([(s, torch.float32) for s in GPU_SHAPES] + [(s, torch.bfloat16) for s in GPU_SHAPES[1::2]]
             + [(s, torch.float16) for s in GPU_SHAPES[::2]])


@requires_cuda
@pytest.mark.parametrize("shape,dtype", GPU_CASES,
                         ids=lambda v: "T{}-H{}-n{}-half{}-k{}".format(*v) if isinstance(v, tuple)
                         else str(v))
def test_gpu_matches_reference(shape, dtype, nan_empty):
    T, H, n, half, k = shape
    check_search("cuda", T, H, n, half, k, dtype=dtype, seed=T + n)


@requires_cuda
def test_gpu_layer_like_qk_norm_inputs(nan_empty):
    """Unit-RMS queries and keys scaled 1/sqrt(half), as the layer's QK-norm produces (fp32)."""
    check_search("cuda", 512, 4, 1024, 256, 32, key_scale=256 ** -0.5, seed=1)


@requires_cuda
def test_gpu_dispatch_follows_search_backend(monkeypatch):
    seen = []
    real = pk.triton_product_key_search
    monkeypatch.setattr(pk, "triton_product_key_search", lambda *a: seen.append(1) or real(*a))
    q, K = (t.cuda() for t in _good())
    want = product_key_search_reference(q, K, 4)
    got = kernels.product_key_search(q, K, 4, backend="torch")
    assert seen == [] and torch.equal(got[1], want[1])
    got = kernels.product_key_search(q, K, 4, backend="triton")
    assert seen == [1] and torch.equal(got[1].sort(-1).values, want[1].sort(-1).values)
