# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The fused training query norm (query BatchNorm over tokens, QK-norm, gain; forward and
backward) against float64 autograd of the same formula: the output, all four gradients and the
step's sums, at odd shapes, bf16 and fp32, with and without padding, a zero-variance column and
a head-major output gradient; the layer's select on the fused path against its torch path. CPU
cases run the kernels in the Triton interpreter with NaN-filled ``torch.empty``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_memory.kernels import query_norm_train as qnt
from tests.conftest import requires_cuda
from tests.kernels.test_embedding_bag import rel_err, run_interpreted, sm90_compile

BN_EPS, QK_EPS = 1e-5, 1e-6
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}   # of q's gradient, stored in q's dtype


def reference(q, weight, bias, gain, keep, half):
    """float64: batch statistics of the keep-weighted tokens, then per-half RMS norm and gain.
    -> (out, y with its gradient retained, scale [D], kappa). kappa = |(|q| + |mean|) |scale| +
    |bias|| / |y| >= 1: how much fp32 rounding of y = q * scale + (bias - mean * scale) is
    amplified relative to y, so every result's tolerance scales with it (one token: y = bias,
    while q * scale ~ 474 q is rounded; ~1 for real batches)."""
    T, D = q.shape
    w = torch.ones(T, 1, dtype=q.dtype) if keep is None else keep.to(q.dtype).view(-1, 1)
    n = w.sum().clamp(min=1.0)
    mean = (q * w).sum(0) / n
    var = ((q * q * w).sum(0) / n - mean * mean).clamp(min=0.0)
    scale = torch.rsqrt(var + BN_EPS) * weight
    y = (q - mean) * scale + bias
    y.retain_grad()
    halves = y.view(T, D // (2 * half), 2, half)
    r = torch.rsqrt(halves.pow(2).mean(-1, keepdim=True) + QK_EPS)
    out = halves * r * gain.view(-1, 2, half)
    with torch.no_grad():
        terms = (q.abs() + mean.abs()) * scale.abs() + bias.abs()
        kappa = max(1.0, (terms.norm() / y.norm().clamp(min=1e-30)).item())
    return out, y, scale.detach(), kappa


def close(got, want, tol, floor=None):
    """Norm-wise: |got - want| <= tol * (|want| + |floor|); floor: the size of terms that cancel
    in want (one token: dq = 0 exactly, from dy * scale minus the same through the sums)."""
    err = (got.detach().double().cpu() - want).norm()
    size = want.norm() + (0.0 if floor is None else floor.norm())
    return err <= tol * size, (err.item(), size.item())


def torch_path(q, weight, bias, gain, keep, half, step_sums):
    """The layer's torch ops (QueryBatchNorm's _TokenBatchNorm, then _normalised's query part)."""
    from megatron_memory.model.query_norm import _TokenBatchNorm

    y = _TokenBatchNorm.apply(q.float(), weight, bias, keep, None, BN_EPS, step_sums)
    y = y.view(q.shape[0], -1, 2, half)
    return F.rms_norm(y, (half,), eps=QK_EPS) * gain.float().view(-1, 2, half)


def inputs(T, H, half, dtype, pdtype, padded, const_col, row_stride, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    D = H * 2 * half
    q = torch.randn(T, D + row_stride, generator=gen) * 3 + 1
    if const_col:
        q[:, D // 3] = 0.25                      # var = 0 exactly: the clamp at 0
    q = q.to(dtype)[:, :D]                       # row stride D + row_stride
    weight, bias = torch.rand(D, generator=gen) + 0.5, torch.randn(D, generator=gen)
    gain = torch.rand(D, generator=gen) + 0.5
    keep = None
    if padded:
        keep = (torch.rand(T, generator=gen) > 0.3).float()
    dout = torch.randn(T, H, 2, half, generator=gen)
    params = [t.to(pdtype) for t in (weight, bias, gain)]
    return [t if t is None else t.to(device) for t in (q, *params, keep, dout)]


def check(T, H, half, dtype=torch.float32, pdtype=torch.float32, padded=False, const_col=False,
          row_stride=0, head_major=False, seed=0, device="cpu"):
    q, weight, bias, gain, keep, dout = inputs(T, H, half, dtype, pdtype, padded, const_col,
                                               row_stride, seed, device)
    if head_major:   # the bf16 search's dq layout: [2H, T, half] viewed as [T, H, 2, half]
        dout = dout.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
    D = H * 2 * half
    start = torch.randn(2 * D + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    step = start.to(device, copy=True)
    leaves = [t.clone().requires_grad_() for t in (q, weight, bias, gain)]
    out = qnt.query_norm_train(*leaves, BN_EPS, QK_EPS, half, step, keep)
    assert out.dtype == torch.float32 and out.shape == (T, H, 2, half)
    out.backward(dout)

    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, weight, bias, gain)]
    keep64 = None if keep is None else keep.cpu().double()
    want, y, scale, kappa = reference(*ref_leaves, keep64, half)
    want.backward(dout.cpu().double())
    ok, info = close(out, want, 2e-6 * kappa)
    assert ok, ("out", kappa, info)
    # dq = dy * scale + w * (d sum q + 2 q d sum q^2): its first term sets its rounding
    floors = (y.grad * scale, None, None, None)
    for name, got, ref, floor in zip(("q", "weight", "bias", "gain"), leaves, ref_leaves, floors):
        assert got.grad.dtype == got.dtype and got.grad.shape == got.shape
        ok, info = close(got.grad, ref.grad, TOL[got.dtype] * kappa, floor)
        assert ok, (name, got.dtype, kappa, info)
    q64 = q.cpu().double()
    w = torch.ones(T, 1, dtype=torch.float64) if keep64 is None else keep64.view(-1, 1)
    sums = torch.cat([(q64 * w).sum(0), (q64 * q64 * w).sum(0), w.sum().view(1)])
    torch.testing.assert_close(step.cpu() - start, sums, rtol=1e-6, atol=1e-4)
    assert step.cpu()[-1] - start[-1] == sums[-1]       # the count exactly


CASES = [
    dict(T=7, H=2, half=8),
    dict(T=9, H=3, half=5, dtype=torch.bfloat16, padded=True),           # odd half, bf16
    dict(T=1, H=1, half=4),
    dict(T=0, H=2, half=8),
    dict(T=0, H=1, half=3, padded=True),
    dict(T=40, H=5, half=20, padded=True, const_col=True, row_stride=3),  # 2 column blocks
    dict(T=33, H=3, half=5, pdtype=torch.bfloat16, head_major=True, const_col=True),
    dict(T=70, H=2, half=6, dtype=torch.bfloat16, padded=True, head_major=True),
]


def interpreter_cases():
    for i, case in enumerate(CASES):
        check(**case, seed=i)
    # few programs: several token tiles per program and several partial rows per finish tile
    saved = qnt.TARGET_PROGRAMS, qnt.FINISH_TILE, qnt.STATS_TILE
    qnt.FINISH_TILE = dict(BLOCK_R=2, BLOCK=16, num_warps=1)
    qnt.STATS_TILE = dict(BLOCK_T=4, BLOCK_D=16, num_warps=1)
    try:
        qnt.TARGET_PROGRAMS = 2
        check(T=50, H=2, half=6, padded=True, seed=20)
        qnt.TARGET_PROGRAMS = 40
        check(T=300, H=1, half=7, dtype=torch.bfloat16, seed=21)   # R = 10 > BLOCK_R
    finally:
        qnt.TARGET_PROGRAMS, qnt.FINISH_TILE, qnt.STATS_TILE = saved
    return len(CASES) + 2


def test_interpreter_matches_float64():
    cases = run_interpreted("tests.kernels.test_query_norm_train", "interpreter_cases", timeout=300)
    assert cases == len(CASES) + 2


def layer_cases():
    """MemoryPlus.select on the fused path (Triton dispatch told to serve CPU tensors, the fp32
    reference search kept) against the torch path: indices, weights, every gradient, and the
    step's sums; once more on integer-valued queries, where every sum is exact, bit for bit."""
    from megatron_memory import kernels
    from megatron_memory.config import MemoryConfig
    from megatron_memory.model.layer import MemoryPlus, MemoryValues
    from tests.conftest import tiny_transformer_config

    calls = []
    fused_op = kernels.fused_query_norm_train

    def counted(*args, **kwargs):
        out = fused_op(*args, **kwargs)
        calls.append(out is not None)
        return out

    kernels.fused_query_norm_train = counted
    use_triton = kernels.use_triton
    checked = 0
    for dtype, k_dim in ((torch.float32, 10), (torch.bfloat16, 16)):
        cfg = tiny_transformer_config(hidden_size=24, params_dtype=dtype)
        # search="torch": the search stays the reference on both paths
        mc = MemoryConfig(n_keys=8, heads=2, k=3, k_dim=k_dim, search="torch")
        mc.validate(cfg.num_layers, 24)
        values = MemoryValues(cfg, mc)
        layers = [MemoryPlus(cfg, mc, values, layer_id=1).train() for _ in range(2)]
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in zip(*(m.parameters() for m in layers)):
                noise = torch.randn(p[0].shape, generator=gen) * 0.3
                for t in p:
                    t.add_(noise.to(t.dtype))
        x = torch.randn(20, 24, generator=gen).to(dtype)
        keep = (torch.arange(20) % 7 != 3).float()
        gw = torch.randn(20, mc.heads * mc.k, generator=gen)
        results, tol = [], 1e-5 if dtype == torch.float32 else 1e-2
        for fused, layer in zip((False, True), layers):
            kernels.use_triton = (lambda t: True) if fused else use_triton
            xi = x.clone().requires_grad_()
            dq = []
            hook = layer.query.register_full_backward_hook(lambda m, gi, go: dq.append(go[0]))
            idx, w = layer.select(xi, keep)
            (w * gw).sum().backward()
            hook.remove()
            kernels.use_triton = use_triton
            grads = [xi.grad] + [p.grad for p in layer.parameters()]
            results.append((idx, w, grads, layer.query_bn.step_sums.clone(), dq[0]))
        (i0, w0, g0, s0, dq0), (i1, w1, g1, s1, dq1) = results
        assert rel_err(dq1, dq0) <= tol
        # query.bias gets sum_t dq[t], which the BatchNorm's shift invariance nearly cancels
        floor = dq0.double().abs().sum(0).norm().item()
        assert torch.equal(i0, i1)
        torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)
        names = ["x"] + [n for n, _ in layers[0].named_parameters()]
        for name, a, b in zip(names, g0, g1):
            if a is None:   # W1, W2: not used by select
                assert b is None, name
                continue
            assert b is not None and b.dtype == a.dtype, name
            err, size = (b - a).double().norm().item(), a.double().norm().item()
            assert err <= tol * (size + (floor if name == "query.bias" else 0.0)), (name, err, size, floor)
        torch.testing.assert_close(s1, s0, rtol=1e-6, atol=0)
        # integer-valued queries: all sums exact, so the accumulators agree bit for bit
        for m in layers:
            m.query_bn.step_sums.zero_()
            with torch.no_grad():
                m.query.weight.copy_(torch.randint(-2, 3, m.query.weight.shape,
                                                   generator=torch.Generator().manual_seed(1)))
                m.query.bias.zero_()
        xi = torch.randint(-3, 4, (20, 24), generator=gen).to(dtype)
        for fused, layer in zip((False, True), layers):
            kernels.use_triton = (lambda t: True) if fused else use_triton
            with torch.no_grad():
                layer.select(xi, keep)
            kernels.use_triton = use_triton
        assert torch.equal(layers[0].query_bn.step_sums, layers[1].query_bn.step_sums)
        for m in layers:
            m.query_bn.finish_step()
        for name in ("running_mean", "running_var", "num_updates"):
            assert torch.equal(getattr(layers[0].query_bn, name), getattr(layers[1].query_bn, name))
        checked += 1
    assert calls == [False, True] * 2 * checked   # the fused op served exactly the fused calls
    return checked


def test_interpreter_layer_select_matches_torch_path():
    assert run_interpreted("tests.kernels.test_query_norm_train", "layer_cases", timeout=300) == 2


def test_cpu_dispatch_runs_the_torch_path():
    from megatron_memory import kernels

    q = torch.zeros(3, 8)
    assert kernels.fused_query_norm_train(q, torch.ones(8), torch.zeros(8), torch.ones(8), BN_EPS,
                                          QK_EPS, 2, torch.zeros(17, dtype=torch.float64)) is None


def test_sm90_compile_without_spills():
    """The default tiles at the layer's shape (D = 2048, half = 256, bf16 q and params)."""
    ptrs = dict(q="bf16", keep="fp32", partial="fp32", sums="fp32", step_sums="fp64", bn_w="bf16",
                bn_b="bf16", gain="bf16", out="fp32", rinv="fp32", dout="fp32", gsums="fp32",
                dweight="bf16", dbias="bf16", dgain="bf16", dq="bf16")
    def split(cfg):
        return {k: v for k, v in cfg.items() if k != "num_warps"}, cfg["num_warps"]

    builds = [(qnt._stats_kernel, dict(qnt.STATS_TILE, HAS_KEEP=True)),
              (qnt._stats_kernel, dict(qnt.STATS_TILE, HAS_KEEP=False)),
              (qnt._sum_rows_kernel, qnt.FINISH_TILE),
              (qnt._normalise_kernel, qnt._tile(256, "normalise")),
              (qnt._grad_reduce_kernel, qnt._tile(256, "reduce")),
              (qnt._grad_finish_kernel, qnt.FINISH_TILE),
              (qnt._grad_apply_kernel, dict(qnt._tile(256, "apply"), HAS_KEEP=True))]
    for fn, cfg in builds:
        constexprs, warps = split(cfg)
        regs, spills = sm90_compile(fn, ptrs, constexprs, warps)
        assert spills == 0, f"{fn.__name__} {constexprs}: {regs} registers, {spills} B spilled"


@pytest.mark.parametrize("kwargs,match", [
    (dict(half=3), r"q must be \[T, H\*2\*half\]"),
    (dict(q=torch.zeros(2, 16, dtype=torch.float64)), "bf16, fp16 or fp32"),
    (dict(gain=torch.ones(8)), r"gain must be a bf16/fp16/fp32 \[16\] vector"),
    (dict(bn_weight=torch.ones(16, dtype=torch.int32)), "bn_weight must be"),
    (dict(step_sums=torch.zeros(33)), r"step_sums must be a contiguous float64 \[33\]"),
    (dict(keep=torch.ones(3)), r"keep must be None or a float \[2\] tensor"),
])
def test_bad_input_is_one_clear_error(kwargs, match):
    args = dict(q=torch.zeros(2, 16), bn_weight=torch.ones(16), bn_bias=torch.zeros(16),
                gain=torch.ones(16), bn_eps=BN_EPS, qk_eps=QK_EPS, half=4,
                step_sums=torch.zeros(33, dtype=torch.float64), keep=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        qnt.query_norm_train(**args)


@requires_cuda
@pytest.mark.parametrize("padded", [False, True])
def test_gpu_matches_torch_path(padded, nan_empty):
    """The layer's shape on CUDA: T = 8192, H = 4, half = 256, bf16 q and params; output and
    gradients against the torch path (and its step sums), both fp32 math."""
    T, H, half = 8192, 4, 256
    q, weight, bias, gain, keep, dout = inputs(T, H, half, torch.bfloat16, torch.bfloat16, padded,
                                               True, 0, 7, "cuda")
    dout = dout.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)   # the bf16 search's layout
    results = []
    for fused in (True, False):
        step = torch.zeros(2 * H * 2 * half + 1, dtype=torch.float64, device="cuda")
        leaves = [t.clone().requires_grad_() for t in (q, weight, bias, gain)]
        if fused:
            out = qnt.query_norm_train(*leaves, BN_EPS, QK_EPS, half, step, keep)
        else:
            out = torch_path(*leaves, keep, half, step)
        out.backward(dout)
        results.append((out.detach(), [t.grad for t in leaves], step))
    (out, grads, step), (want, want_grads, want_step) = results
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert rel_err(out, want) <= 1e-6
    for got, ref in zip(grads, want_grads):
        assert got.dtype == ref.dtype and rel_err(got, ref) <= 5e-3, rel_err(got, ref)
    torch.testing.assert_close(step, want_step, rtol=1e-6, atol=1e-3)
