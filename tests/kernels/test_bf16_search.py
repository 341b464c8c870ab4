# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""bf16 tensor-core search with fp32 re-scoring against the fp32 / fp64 reference: the selected
sets are the reference's, scores are the exact fp32 scores of the chosen keys, and dq / dK are
the reference gradients to bf16 precision. CPU cases run the Triton kernels in the interpreter
(the bf16 GEMMs are torch's); GPU cases use ``requires_cuda``."""
from __future__ import annotations

import pytest
import torch

from megatron_memory import kernels
from megatron_memory.kernels.reference import product_key_search_reference
from tests.conftest import requires_cuda
from tests.kernels.test_embedding_bag import rel_err, run_interpreted, sm90_compile
from tests.kernels.test_product_key import scores_at

from megatron_memory.kernels import bf16_search as bs
from megatron_memory.kernels import triton_product_key as pk

GRAD_TOL = 2e-2  # bf16 gradient of the scores and bf16 GEMM inputs (fp32 accumulation)


def layer_like(T, H, n, half, seed):
    """Unit-RMS fp32 queries and keys scaled 1/sqrt(half), as the layer's QK-norm gives them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 2, half, generator=gen)
    K = torch.randn(H, 2, n, half, generator=gen)
    K = K / K.pow(2).mean(-1, keepdim=True).sqrt() * half ** -0.5
    return q, K


def check_bf16_search(device, T, H, n, half, k, seed=0, margin=bs.RESCORE_MARGIN, exact_sets=True,
                      rescore="fused", cast_keys=False, training_rows=None, softmax=False,
                      small_rows=None):
    """exact_sets: every row selects the fp32 reference's set. Large shapes hold rows whose k-th
    and (k+1)-th scores differ by less than fp32 rounding, where two fp32 searches (torch's
    einsum vs the fused Triton one: 99.997% equal at T=8192) already disagree; there every row
    must be a valid top-k within fp32 rounding and >= 99.9% of rows the reference's set.
    training_rows / small_rows lower ``bs.RESCORE_TRAINING_ROWS`` / ``pk.SMALL_ROWS`` for the call,
    so a few rows take the training-size tiles (the interpreter runs each program in Python)."""
    q, K = layer_like(T, H, n, half, seed)
    dscores = torch.randn(T, H, k, generator=torch.Generator().manual_seed(seed + 1))
    want_s, want_i = product_key_search_reference(q, K, k)                # fp32 search
    qt, Kt = q.to(device, copy=True).requires_grad_(), K.to(device, copy=True).requires_grad_()
    kb = Kt.detach().to(torch.bfloat16) if cast_keys else None
    threshold, small = bs.RESCORE_TRAINING_ROWS, pk.SMALL_ROWS
    bs.RESCORE_TRAINING_ROWS = training_rows or threshold   # lowered: training tile at small T
    pk.SMALL_ROWS = small_rows or small                     # lowered: the product step's large tile
    try:
        scores, idx = bs.bf16_product_key_search(qt, Kt, k, margin, keys_bf16=kb, softmax=softmax,
                                                 rescore=rescore)
    finally:
        bs.RESCORE_TRAINING_ROWS, pk.SMALL_ROWS = threshold, small
    if softmax:
        check_softmax_weights(scores, idx, qt, Kt, q, K, dscores)
        return
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64 and scores.shape == (T, H, k)
    assert torch.all(scores[..., :-1] >= scores[..., 1:]), "scores not descending"
    got_i = idx.cpu()
    same = (got_i.sort(-1).values == want_i.sort(-1).values).all(-1)
    qr, Kr = q.double().requires_grad_(), K.double().requires_grad_()
    if exact_sets:
        assert same.all(), f"{int((~same).sum())} rows select another set"
        torch.testing.assert_close(scores.cpu(), want_s, rtol=0, atol=1e-5)
    else:
        assert same.float().mean() >= 0.999, same.float().mean()
        chosen = scores_at(q.double(), K.double(), got_i)
        torch.testing.assert_close(scores.cpu().double(), chosen, rtol=0, atol=1e-5)
        assert torch.all(chosen.min(-1).values >= want_s[..., -1].double() - 1e-5), "not a top-k set"
    scores_at(qr, Kr, got_i).backward(dscores.double())
    scores.backward(dscores.to(device))
    assert qt.grad.dtype == torch.float32 and Kt.grad.dtype == torch.float32
    assert rel_err(qt.grad, qr.grad) <= GRAD_TOL, rel_err(qt.grad, qr.grad)
    assert rel_err(Kt.grad, Kr.grad) <= GRAD_TOL, rel_err(Kt.grad, Kr.grad)


def check_softmax_weights(weights, idx, qt, Kt, q, K, dweights):
    """softmax=True: the weights are the softmax of the exact scores of the chosen keys, and
    the gradients those of autograd through torch.softmax in float64, to bf16 precision."""
    got_i = idx.cpu()
    qr, Kr = q.double().requires_grad_(), K.double().requires_grad_()
    want = torch.softmax(scores_at(qr, Kr, got_i), dim=-1)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.cpu().double(), want.detach(), rtol=0, atol=2e-6)
    want.backward(dweights.double())
    weights.backward(dweights.to(weights.device))
    assert rel_err(qt.grad, qr.grad) <= GRAD_TOL, rel_err(qt.grad, qr.grad)
    assert rel_err(Kt.grad, Kr.grad) <= GRAD_TOL, rel_err(Kt.grad, Kr.grad)


SELECT_DEFAULT = dict(bs.SELECT_TILE)
INTERPRETER_CASES = [
    dict(T=16, H=2, n=64, half=16, k=8),
    dict(T=9, H=3, n=37, half=24, k=5),          # odd sizes, k not a power of two
    dict(T=5, H=1, n=6, half=4, k=4, margin=8),  # K1 capped at n
    dict(T=1, H=2, n=100, half=80, k=7, cast_keys=True),  # a decode step; 2 column blocks
    dict(T=9, H=3, n=37, half=24, k=5, rescore="loop"),   # the serial re-scoring kernel
    dict(T=5, H=1, n=6, half=4, k=4, margin=8, rescore="loop", cast_keys=True),
    # R = T*H = 14 > SMALL_ROWS (lowered to 4): the product step's large tile (CANDIDATES_TILE,
    # 4 rows per program), its last program partial
    dict(T=7, H=2, n=24, half=8, k=6, small_rows=4),
    dict(T=9, H=3, n=37, half=72, k=5, training_rows=1),   # re-scoring's training tile, 3 blocks
    dict(T=9, H=3, n=37, half=24, k=5, softmax=True),      # the layer's weights, fused softmax
    dict(T=7, H=2, n=24, half=8, k=6, small_rows=4, softmax=True),   # the same in the large tile
]


def check_select(rows, n, k1, seed):
    """_select_kernel picks K1 distinct columns holding the K1 largest values (ties at the K1-th
    broken arbitrarily), as torch.topk does; coarse bf16 values make ties frequent."""
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, rows, n, generator=gen) * 4).round().to(torch.bfloat16)  # many ties
    s[0, 0, :] = 1.0                                                               # all equal
    cand = bs._candidates(s, k1)
    # 2 * rows is not always a multiple of the rows per program; early exit: the same sets
    for rows_per_program, warps, early in ((2, 2, False), (4, 4, False), (1, 2, True), (2, 4, True)):
        bs.SELECT_TILE = dict(ROWS=rows_per_program, num_warps=warps, EARLY=early)
        try:
            assert torch.equal(bs._candidates(s, k1), cand), (rows_per_program, warps, early)
        finally:
            bs.SELECT_TILE = dict(SELECT_DEFAULT)
    assert cand.shape == (2, rows, k1) and cand.min() >= 0 and cand.max() < n
    assert torch.all(cand.sort(-1).values.diff(dim=-1) > 0), "a column chosen twice"
    kth = s.float().topk(k1, dim=-1).values[..., -1:]
    picked = s.float().gather(-1, cand)
    assert torch.all(picked >= kth)
    assert torch.equal((s.float() > kth).sum(-1), (picked > kth).sum(-1)), "a larger value left out"


def interpreter_bf16_cases():
    for rows, n, k1, seed in ((5, 64, 12, 0), (3, 37, 37, 1), (4, 100, 1, 2)):
        check_select(rows, n, k1, seed)
    for case in INTERPRETER_CASES:
        check_bf16_search("cpu", **case)
    return len(INTERPRETER_CASES)


def test_interpreter_bf16_search():
    assert run_interpreted("tests.kernels.test_bf16_search", "interpreter_bf16_cases",
                           timeout=600) == len(INTERPRETER_CASES)


def test_sm90_compile_without_spills():
    """The candidate selection (n=1024), the re-scoring kernel (half=256, fp32 inputs) and the
    product step with its ranks compile for H100 without spills."""

    tile = dict(bs.SELECT_TILE)
    for early in (False, True):
        regs, spills = sm90_compile(bs._select_kernel, dict(scores="bf16", cand="i64"),
                                    dict(BLOCK_N=1024, ROWS=tile["ROWS"], EARLY=early),
                                    tile["num_warps"])
        assert spills == 0, f"select (early exit {early}): {regs} registers, {spills} B spilled"
    regs, spills = sm90_compile(bs._rescore_kernel, dict(q="fp32", keys="fp32", cand="i64", out="fp32"),
                                dict(BLOCK_T=16, BLOCK_D=256), 4)
    assert spills == 0, f"rescore: {regs} registers, {spills} B spilled"
    for rows in (8, bs.RESCORE_TRAINING_ROWS):   # decode and training tiles
        cfg = bs.rescore_config(256, rows)
        regs, spills = sm90_compile(bs._rescore_topk_kernel, dict(
            q="fp32", keys="fp32", cand="i64", top_s="fp32", top_i="i32"),
            dict(K_PAD=32, K1_PAD=64, BLOCK_D=cfg["BLOCK_D"]), cfg["num_warps"])
        assert spills == 0, f"fused rescore {cfg}: {regs} registers, {spills} B spilled"
    P = pk._pairs(32, 32, torch.device("cpu"))[2]
    ptrs = dict(top_s="fp32", top_i="i32", pair_a="i32", pair_b="i32", scores="fp32",
                indices="i64", ranks="i32")
    for block_r, warps in (pk.CANDIDATES_TILE or (pk.candidates_block(P), 4), (1, 1)):   # large R; decode
        for softmax in (False, True):
            regs, spills = sm90_compile(pk._candidates_kernel, ptrs, dict(
                K_PAD=32, P=P, BLOCK_R=block_r, WRITE_RANKS=True, SOFTMAX=softmax), warps)
            assert spills == 0, f"candidates, {block_r} rows: {regs} registers, {spills} B spilled"


def test_bad_margin_raises():
    q, K = layer_like(2, 1, 8, 4, 0)
    with pytest.raises(ValueError, match="margin"):
        bs.bf16_product_key_search(q, K, 2, -1)


@pytest.mark.parametrize("bad", ["fp32", "shape"])
def test_bad_keys_bf16_raises(bad):
    q, K = layer_like(2, 1, 8, 4, 0)
    kb = K if bad == "fp32" else K[:, :, :4].to(torch.bfloat16)
    with pytest.raises(ValueError, match="keys_bf16 must be bf16"):
        bs.bf16_product_key_search(q, K, 2, keys_bf16=kb)


@requires_cuda
@pytest.mark.parametrize("T,H,n,half,k,exact", [
    (512, 4, 1024, 256, 32, True), (300, 2, 256, 64, 16, True), (64, 4, 128, 128, 37, True),
    (8192, 4, 1024, 256, 32, False)])
def test_gpu_matches_fp32_reference(T, H, n, half, k, exact):
    check_bf16_search("cuda", T, H, n, half, k, seed=T + n, exact_sets=exact)


@requires_cuda
@pytest.mark.parametrize("T,H,n,half,k", [(8192, 4, 1024, 256, 32), (33, 3, 100, 24, 7)])
def test_gpu_softmax_weights(T, H, n, half, k):
    check_bf16_search("cuda", T, H, n, half, k, seed=T, softmax=True)


@requires_cuda
@pytest.mark.parametrize("T", [1, 3, 256, 8192])
def test_gpu_fused_rescore_matches_loop(T):
    """The fused re-scoring selects the serial kernel's sets, per half and in the product, with
    the same fp32 scores up to summation order (it sums the width in 64-column blocks), from
    decode steps to a training batch."""
    q, K = layer_like(T, 4, 1024, 256, T)
    q, K = q.cuda(), K.cuda()
    out = {}
    for mode in ("loop", "fused"):
        out[mode] = bs.bf16_search_forward(q, K, 32, rescore=mode)
    (s0, i0, t0, _), (s1, i1, t1, _) = out["loop"][:4], out["fused"][:4]
    same = (i0.sort(-1).values == i1.sort(-1).values).all(-1)
    assert same.float().mean() >= (1.0 if T <= 256 else 0.999), same.float().mean()
    torch.testing.assert_close(s1[same], s0[same], rtol=0, atol=1e-5)
    halves = (t0[..., :32].sort(-1).values == t1[..., :32].sort(-1).values).all(-1)
    assert halves.float().mean() >= (1.0 if T <= 256 else 0.999)


@requires_cuda
def test_gpu_default_dispatch_is_bf16(monkeypatch):
    seen = []
    real = bs.bf16_product_key_search
    monkeypatch.setattr(bs, "bf16_product_key_search", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    q, K = layer_like(64, 2, 64, 16, 3)   # 64 tokens: above the decode search's MAX_TOKENS
    kernels.product_key_search(q.cuda(), K.cuda(), 4)
    assert seen == [1]



def check_score_grad(T, H, n, k, seed, dtype=torch.float32, device="cpu", half=8):
    """The fused gradient scatter equals its torch form bit for bit: the per-rank sums are of
    small integers (exact in fp32 in any order, and in bf16), duplicate ranks included; every
    other element of ds stays zero (the kernel writes into a memset)."""
    q, K = layer_like(T, H, n, half, seed)
    _, _, top_i, ranks, *_ = bs.bf16_search_forward(q.to(device), K.to(device), k)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(-8, 9, (T, H, k), generator=gen).to(device, dtype)
    got = bs.score_grad(g, top_i, ranks, n)
    assert got.dtype == torch.bfloat16 and got.shape == (2 * H, T, n)
    assert torch.equal(got, bs.score_grad_reference(g, top_i, ranks, n))
    a = ranks.long() // top_i.shape[-1]
    assert (a[..., :, None] == a[..., None, :]).sum() > a.numel(), "no rank shared by two pairs"


def interpreter_score_grad_cases():
    cases = [(7, 3, 37, 5, 0), (4, 2, 64, 8, 1), (1, 1, 6, 4, 2), (3, 2, 40, 7, 3, torch.bfloat16)]
    for case in cases:
        check_score_grad(*case)
    return len(cases)


def test_interpreter_score_grad_matches_torch_form():
    assert run_interpreted("tests.kernels.test_bf16_search", "interpreter_score_grad_cases",
                           timeout=300) == 4


def test_sm90_score_grad_compiles_without_spills():
    for softmax in (False, True):
        regs, spills = sm90_compile(bs._score_grad_kernel, dict(
            grad="fp32", w="fp32", ranks="i32", top_i="i32", ds="bf16"),
            dict(K_PAD=32, SOFTMAX=softmax), 1)
        assert spills == 0, f"score grad (softmax {softmax}): {regs} registers, {spills} B spilled"


@requires_cuda
@pytest.mark.parametrize("T,H,n,k", [(8192, 4, 1024, 32), (33, 3, 100, 7)])
def test_gpu_score_grad_matches_torch_form(T, H, n, k):
    check_score_grad(T, H, n, k, seed=5, device="cuda", half=16)


def layer_weights_cases():
    """MemoryPlus.select with the bf16 search (softmax in its kernels) against the fp32 torch
    search + torch.softmax, the rest of the layer's path the same: same indices, the weights to
    fp32 rounding, the gradients of x and the keys to bf16 precision."""
    from megatron_memory.config import MemoryConfig
    from megatron_memory.model.layer import MemoryPlus, MemoryValues
    from tests.conftest import tiny_transformer_config

    kernels.use_triton = lambda t: True      # the Triton path on CPU tensors (interpreter)
    cfg = tiny_transformer_config(hidden_size=24, params_dtype=torch.float32)
    mc = MemoryConfig(n_keys=8, heads=2, k=3, k_dim=16)
    mc.validate(cfg.num_layers, 24)
    layer = MemoryPlus(cfg, mc, MemoryValues(cfg, mc), layer_id=1).train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 24, generator=gen)
    gw = torch.randn(20, mc.heads * mc.k, generator=gen)
    out = {}
    for backend in ("torch", "bf16"):
        mc.search = backend
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        idx, w = layer.select(xi)
        (w * gw).sum().backward()
        out[backend] = idx, w, xi.grad, layer.keys.grad.clone()
    (i0, w0, gx0, gk0), (i1, w1, gx1, gk1) = out["torch"], out["bf16"]
    assert torch.equal(i0, i1)
    torch.testing.assert_close(w1, w0, rtol=0, atol=1e-6)
    errs = rel_err(gx1, gx0), rel_err(gk1, gk0)
    assert max(errs) <= GRAD_TOL, errs
    return 1


def test_interpreter_layer_weights_match_torch_search():
    assert run_interpreted("tests.kernels.test_bf16_search", "layer_weights_cases",
                           timeout=300) == 1
