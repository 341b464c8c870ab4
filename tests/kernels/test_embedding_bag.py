# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Triton EmbeddingBag against the fp64 reference: output, weight grads, table grads.

The same ``check_case`` runs on the GPU (``requires_cuda``) and, with tiny shapes, on CPU under
Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before triton is imported).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_memory import kernels
from megatron_memory.kernels.reference import embedding_bag_reference
from tests.conftest import requires_cuda

# The package's `embedding_bag` attribute is the dispatch function, which shadows the submodule.
from megatron_memory.kernels import triton_embedding_bag as eb
ROOT = Path(__file__).resolve().parents[2]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_indices(N, T, bag, pattern, gen):
    """random: uniform; hot: every index the same row; dup: half of each bag repeats one row."""
    if pattern == "hot":
        return torch.full((T, bag), N - 1, dtype=torch.int64)
    idx = torch.randint(0, N, (T, bag), generator=gen)
    if pattern == "dup":
        idx[:, : (bag + 1) // 2] = idx[:, :1]
    return idx


def check_case(device, N, d, T, bag, dtype=torch.float32, idx_dtype=torch.int64,
               pattern="random", target="main_grad", deterministic=None,
               w_dtype=torch.float32, seed=0):
    """Forward + backward of triton_embedding_bag vs the fp64 reference on the same quantised
    inputs. target: where the table gradient goes: main_grad (pre-filled), grad_none,
    grad_existing (pre-filled .grad), plain (a non-Parameter leaf: returned gradient) or
    frozen (no table gradient, weight grads only)."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype)
    idx = make_indices(N, T, bag, pattern, gen)
    w = torch.rand(T, bag, generator=gen, dtype=torch.float64).to(w_dtype)
    g = torch.randn(T, d, generator=gen, dtype=torch.float64).to(dtype)
    Vr, wr = V.double().requires_grad_(), w.double().requires_grad_()
    ref = embedding_bag_reference(Vr, idx, wr)
    ref.backward(g.double())
    scale = Vr.grad.std().item() if Vr.grad.numel() > 1 else 1.0
    pre = (torch.randn(N, d, generator=gen, dtype=torch.float64) * scale)

    table = torch.nn.Parameter(V.to(device, copy=True), requires_grad=target != "frozen")
    calls = []
    if target == "main_grad":
        table.main_grad = pre.float().to(device)
        table.memory_grad_ready_hook = lambda: calls.append(1)
    elif target == "grad_existing":
        table.grad = pre.to(dtype).to(device)
    elif target == "plain":
        table = V.to(device, copy=True).requires_grad_()
    before = (table.main_grad.clone() if target == "main_grad"
              else table.grad.clone() if target == "grad_existing" else None)
    wt = w.to(device, copy=True).requires_grad_()
    out = eb.triton_embedding_bag(table, idx.to(device=device, dtype=idx_dtype), wt,
                                  deterministic=deterministic)
    assert out.dtype == dtype and out.shape == (T, d)
    assert rel_err(out, ref) <= TOL[dtype], rel_err(out, ref)
    out.backward(g.to(device))
    assert wt.grad.dtype == w_dtype
    assert rel_err(wt.grad, wr.grad) <= max(TOL[w_dtype], 1e-5), rel_err(wt.grad, wr.grad)

    unused = torch.ones(N, dtype=torch.bool)
    unused[idx.flatten()] = False
    unused = unused.to(device)
    if target == "main_grad":
        got = table.main_grad
        assert calls == [1] and table.grad is None and got.dtype == torch.float32
        assert rel_err(got.cpu().double() - before.cpu().double(), Vr.grad) <= 1e-5
        assert torch.equal(got[unused], before[unused]), "unused main_grad rows changed"
    elif target in ("grad_none", "grad_existing"):
        got = table.grad
        assert got is not None and got.dtype == dtype
        base = before if before is not None else torch.zeros_like(got)
        assert rel_err(got.cpu().double() - base.cpu().double(), Vr.grad) <= TOL[dtype]
        assert torch.equal(got[unused], base[unused]), "unused .grad rows changed"
    elif target == "plain":
        assert table.grad.dtype == dtype
        assert rel_err(table.grad, Vr.grad) <= TOL[dtype]
    else:
        assert table.grad is None


def install_interpreter_shim():
    """Triton 3.6's interpreter calls int() on 1-element numpy arrays (every scalar there), which
    numpy >= 2.5 refuses; index them explicitly. Interpreter-only: compiled kernels are unaffected."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def install_nan_empty():
    """Subprocess twin of the ``nan_empty`` fixture: float empties come back NaN-filled."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))


def run_interpreted(module: str, function: str, timeout: int = 120):
    """Run ``module.function()`` in a fresh interpreter with TRITON_INTERPRET=1; returns its
    JSON-printed result (last stdout line)."""
    code = (f"import json; from tests.kernels.test_embedding_bag import install_interpreter_shim, "
            f"install_nan_empty; install_interpreter_shim(); install_nan_empty(); "
            f"from {module} import {function}; print(json.dumps({function}()))")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Tiny cases for the interpreter: every kernel, both strategies, every gradient target,
# split hot rows (SEGMENT_CHUNK lowered to 3), several column blocks (d=600 fp32), several bag
# tiles, dtypes.
INTERPRETER_CASES = [
    dict(N=97, d=13, T=5, bag=7, pattern="dup", target="main_grad"),
    dict(N=97, d=13, T=5, bag=7, pattern="dup", target="main_grad", deterministic=False),
    dict(N=1, d=3, T=4, bag=5, pattern="hot", target="grad_none", idx_dtype=torch.int32),
    dict(N=5, d=3, T=4, bag=5, pattern="hot", target="main_grad", deterministic=False),
    dict(N=4099, d=1, T=1, bag=3, dtype=torch.bfloat16, idx_dtype=torch.int32,
         target="grad_existing", w_dtype=torch.bfloat16),
    dict(N=37, d=600, T=3, bag=4, target="main_grad", deterministic=True),
    dict(N=37, d=600, T=3, bag=4, target="plain", deterministic=False),
    # bag 11 > BAG_BLOCK 8 at 512 fp32 columns: the gathering kernels' index prefetch runs
    # across a full and a partial bag tile
    dict(N=37, d=600, T=3, bag=11, pattern="dup", target="main_grad", deterministic=False),
    dict(N=11, d=9, T=6, bag=3, dtype=torch.float16, target="plain"),
    dict(N=11, d=9, T=6, bag=3, target="frozen"),
]


def interpreter_embedding_bag_cases():
    eb.SEGMENT_CHUNK = 3
    for case in INTERPRETER_CASES:
        check_case("cpu", **case)
    V = torch.randn(6, 4, dtype=torch.float64)  # fp64 falls back to the reference
    idx, w = torch.randint(0, 6, (3, 2)), torch.rand(3, 2, dtype=torch.float64)
    torch.testing.assert_close(eb.triton_embedding_bag(V, idx, w), embedding_bag_reference(V, idx, w))
    return len(INTERPRETER_CASES)


def test_interpreter_embedding_bag():
    assert run_interpreted("tests.kernels.test_embedding_bag", "interpreter_embedding_bag_cases") \
        == len(INTERPRETER_CASES)


def check_deferred(device, N, d, T, bag, lookups, dtype=torch.float32, seed=0, max_bytes=None):
    """``lookups`` lookups into one table with main_grad: per-lookup passes vs one deferred fold
    (DeferredTableGrad) vs the fp64 reference. Weight grads come back at once either way; the
    deferred table gradient touches main_grad only in fold(), without the ready hook. With
    ``max_bytes`` the record folds whenever it reaches that many bytes, in the backward."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype)
    cases = [(make_indices(N, T, bag, "dup" if n % 2 else "random", gen),
              torch.rand(T, bag, generator=gen, dtype=torch.float64),
              torch.randn(T, d, generator=gen, dtype=torch.float64)) for n in range(lookups)]
    ref = torch.zeros(N, d, dtype=torch.float64)
    for idx, w, g in cases:
        ref.index_add_(0, idx.flatten(), (w[..., None] * g[:, None, :]).reshape(-1, d))
    pre = torch.randn(N, d, generator=gen, dtype=torch.float64) * ref.std().item()
    results = {}
    for mode in ("immediate", "deferred"):
        table = torch.nn.Parameter(V.to(device, copy=True))
        table.main_grad = pre.float().to(device)
        calls = []
        table.memory_grad_ready_hook = lambda: calls.append(1)  # noqa: B023
        if mode == "deferred":
            table.memory_deferred_grad = eb.DeferredTableGrad(max_bytes)
        wgrads = []
        for idx, w, g in cases:
            wt = w.float().to(device).requires_grad_()
            eb.triton_embedding_bag(table, idx.to(device), wt).backward(g.to(dtype).to(device))
            wgrads.append(wt.grad)
        if mode == "deferred" and max_bytes is None:
            assert torch.equal(table.main_grad.cpu(), pre.float()) and calls == []
            assert table.memory_deferred_grad.fold(table) and not table.memory_deferred_grad.fold(table)
        elif mode == "deferred":   # folded in the backward whenever the record reached max_bytes
            assert not torch.equal(table.main_grad.cpu(), pre.float()) and calls == []
            left = len(table.memory_deferred_grad.parts)
            assert left < lookups and table.memory_deferred_grad.fold(table) == (left > 0)
            assert table.memory_deferred_grad.recorded == 0
        else:
            assert len(calls) == lookups
        assert table.grad is None
        got = table.main_grad.cpu().double() - pre.float().double()
        assert rel_err(got, ref) <= TOL[dtype], (mode, rel_err(got, ref))
        results[mode] = (table.main_grad.cpu(), torch.stack(wgrads).cpu())
    unused = torch.ones(N, dtype=torch.bool)
    unused[torch.cat([idx.flatten() for idx, _, _ in cases])] = False
    assert torch.equal(results["deferred"][0][unused], pre.float()[unused])
    assert rel_err(results["deferred"][0], results["immediate"][0]) <= 1e-6
    assert rel_err(results["deferred"][1], results["immediate"][1]) <= 1e-6
    mixed = eb.DeferredTableGrad()
    mixed.add(torch.zeros(1, d), torch.zeros(1, bag, dtype=torch.int64), torch.zeros(1, bag))
    mixed.add(torch.zeros(1, d), torch.zeros(1, bag + 1, dtype=torch.int64), torch.zeros(1, bag + 1))
    with pytest.raises(ValueError, match="bag sizes"):
        mixed.fold(table)


def interpreter_deferred_cases():
    eb.SEGMENT_CHUNK = 3  # split runs across lookups too
    check_deferred("cpu", N=53, d=7, T=6, bag=5, lookups=4)
    check_deferred("cpu", N=9, d=300, T=3, bag=4, lookups=3)
    one = 6 * 7 * 4 + 6 * 5 * (8 + 4)    # bytes one lookup records: fp32 g, int64 idx, fp32 w
    check_deferred("cpu", N=53, d=7, T=6, bag=5, lookups=5, max_bytes=2 * one)   # folds twice
    return 3


def test_interpreter_deferred_table_grad():
    assert run_interpreted("tests.kernels.test_embedding_bag", "interpreter_deferred_cases") == 3


def check_fold(device, N, d, T, bag, dtype=torch.float32, seed=0):
    """launch_fold (the deferred fold's kernel) against the fp64 sums and the per-lookup segment
    pass, over column blocks and occurrence tiles narrower and wider than the defaults, hot rows
    split across chunks (chunk 3), and a buffer in bf16."""
    gen = torch.Generator().manual_seed(seed)
    idx = make_indices(N, T, bag, "dup", gen)
    idx[0, :] = 1                                   # a hot row: runs split across chunks
    w = torch.rand(T, bag, generator=gen, dtype=torch.float64)
    g = torch.randn(T, d, generator=gen, dtype=torch.float64)
    ref = torch.zeros(N, d, dtype=torch.float64).index_add_(
        0, idx.flatten(), (w[..., None] * g[:, None, :]).reshape(-1, d))
    pre = torch.randn(N, d, generator=gen, dtype=torch.float64)
    dev = lambda t, dt: t.to(dt).to(device)  # noqa: E731
    seg = dev(pre, torch.float32)
    eb.launch_segment_backward(dev(g, dtype), seg, dev(idx, torch.int64), dev(w, torch.float32),
                               seg, False, chunk=3)
    configs = [None, dict(BLOCK_D=16, BLOCK_P=1, num_warps=1), dict(BLOCK_D=32, BLOCK_P=8, num_warps=2)]
    for cfg in configs:
        for programs in (None, 2):
            buf = dev(pre, torch.float32)
            eb.launch_fold(dev(g, dtype), dev(idx, torch.int32), dev(w, torch.float32), buf,
                           chunk=3, config=cfg, programs=programs)
            assert rel_err(buf.cpu().double() - pre.float().double(), ref) <= TOL[dtype], cfg
            assert torch.equal(buf.cpu(), seg.cpu()), cfg   # same chunking: the same fp32 sums
    low = dev(pre, torch.bfloat16)
    eb.launch_fold(dev(g, dtype), dev(idx, torch.int64), dev(w, torch.bfloat16), low, chunk=3)
    assert rel_err(low.cpu().double(), pre + ref) <= TOL[torch.bfloat16]
    return len(configs)


def interpreter_fold_cases():
    return check_fold("cpu", N=41, d=70, T=5, bag=6) + check_fold("cpu", N=7, d=3, T=3, bag=4,
                                                                    dtype=torch.bfloat16, seed=1)


def test_interpreter_fold():
    assert run_interpreted("tests.kernels.test_embedding_bag", "interpreter_fold_cases") == 6


def test_fold_config_caps_columns_at_the_width():
    assert eb.fold_config(2048) == eb.FOLD_TILE
    assert eb.fold_config(40)["BLOCK_D"] == 64 and eb.fold_config(3)["BLOCK_D"] == 16


# ------------------------------------------------------------------------------------------
# CPU: ahead-of-time compilation for sm_90 (Triton's bundled LLVM and ptxas; no GPU needed)
# ------------------------------------------------------------------------------------------

def sm90_compile(fn, pointers: dict, constexprs: dict, num_warps: int, scalars: dict = None):
    """Compile a kernel for sm_90 -> (registers, spill-store bytes) from ``ptxas -v``. Arguments
    not named in ``pointers`` (name -> element type, e.g. "bf16"), ``scalars`` (name -> type,
    e.g. "fp32") or ``constexprs`` are i32."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("Triton's bundled ptxas is missing")
    scalars = scalars or {}
    sig = {a: "constexpr" if a in constexprs else "*" + pointers[a] if a in pointers
           else scalars.get(a, "i32") for a in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        log = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    return regs, sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))


def test_sm90_compile_without_spills():
    """Every kernel compiles for H100 at the layer's shapes (d=4096, bag=128, bf16) and at the
    smallest ones (d=1, bag=1: Triton specialises ints equal to 1), without register spills."""
    ptrs = dict(values="bf16", indices="i64", weights="fp32", out="bf16", grad_out="bf16",
                sorted_pos="i64", chunk_start="i32", chunk_row="i64", chunk_slot="i32", n_chunks="i32",
                buf="fp32", partial="fp32", dots="fp32", fold_row="i64", fold_slot="i32")
    fwd, seg = eb.gather_config(4096, 2, 128), eb.segment_config(4096, 2)
    tiles = lambda cfg: {k: v for k, v in cfg.items() if k != "num_warps"}  # noqa: E731
    builds = [(eb._forward_kernel, ptrs, tiles(fwd), fwd["num_warps"]),
              (eb._forward_kernel, dict(ptrs, values="fp32", indices="i32", out="fp32"),
               dict(tiles(eb.gather_config(1, 4, 1)), bag=1, d=1, stride_v=1), 1),
              (eb._fold_kernel, ptrs, dict(BLOCK_S=16, BLOCK_D=256), 2)]
    fold = eb.fold_config(2048)
    builds.append((eb._segment_kernel, dict(ptrs, sorted_pos="i32"),
                   dict(tiles(fold), NEED_DOTS=False, SORTED=True), fold["num_warps"]))
    for need_dots in (True, False):
        for buf in ("fp32", "bf16"):
            builds.append((eb._segment_kernel, dict(ptrs, buf=buf),
                           dict(tiles(seg), NEED_DOTS=need_dots), seg["num_warps"]))
        builds.append((eb._token_kernel, ptrs, dict(tiles(fwd), NEED_DOTS=need_dots,
                                                     SCATTER=not need_dots), fwd["num_warps"]))
    for fn, pointers, constexprs, warps in builds:
        regs, spills = sm90_compile(fn, pointers, constexprs, warps)
        assert spills == 0, f"{fn.__name__} {constexprs}: {regs} registers, {spills} B spilled"


# ------------------------------------------------------------------------------------------
# CPU: validation and dispatch (no kernel runs)
# ------------------------------------------------------------------------------------------

def _good():
    return torch.randn(10, 4), torch.randint(0, 10, (3, 5)), torch.rand(3, 5)


@pytest.mark.parametrize("mutate,match", [
    (lambda v, i, w: (v[0], i, w), "values must be"),
    (lambda v, i, w: (v, i[0], w[0]), "indices must be"),
    (lambda v, i, w: (v, i, w[:, :2]), "weights shape"),
    (lambda v, i, w: (v, i.to(torch.int16), w), "int32 or int64"),
    (lambda v, i, w: (v.to(torch.int32), i, w), "values dtype"),
    (lambda v, i, w: (v, i, w.to(torch.int64)), "weights dtype"),
    (lambda v, i, w: (v.t().contiguous().t(), i, w), "unit column stride"),
    (lambda v, i, w: (v, i, w), "CUDA tensors"),
])
def test_bad_inputs_raise_value_error(mutate, match):
    with pytest.raises(ValueError, match=match):
        eb.triton_embedding_bag(*mutate(*_good()))


def test_bad_main_grad_and_deterministic_raise_value_error():
    v, i, w = _good()
    p = torch.nn.Parameter(v)
    p.main_grad = torch.zeros(10, 5)
    with pytest.raises(ValueError, match="main_grad shape"):
        eb.triton_embedding_bag(p, i, w)
    with pytest.raises(ValueError, match="deterministic"):
        eb.triton_embedding_bag(v, i, w, deterministic="yes")


def test_strategy_selection_honours_deterministic_mode():
    assert eb._strategy(True) == "segment" and eb._strategy(False) == "atomic"
    assert eb._strategy(None) == eb.DEFAULT_STRATEGY
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert eb._strategy(False) == "segment" and eb._strategy(None) == "segment"
    finally:
        torch.use_deterministic_algorithms(was)


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    assert kernels.HAVE_TRITON
    monkeypatch.setattr(eb, "triton_embedding_bag", lambda *a, **k: pytest.fail("Triton on CPU"))
    v, i, w = _good()
    assert not kernels.use_triton(v)
    torch.testing.assert_close(kernels.embedding_bag(v, i, w), embedding_bag_reference(v, i, w))


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1, 1), (97, 3, 33, 16), (4099, 127, 64, 128), (4099, 1000, 300, 128),
          (97, 1000, 1, 7), (5000, 4096, 40, 128)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TARGETS = ["main_grad", "grad_none", "grad_existing", "plain"]
STRATEGIES = [None, True, False]


def _gpu_cases():
    """Shapes x index patterns; table dtype, strategy (every pair of the two), index dtype and
    gradient target rotate so each value meets several shapes and patterns."""
    cases = []
    for n, (shape, pattern) in enumerate((s, p) for s in SHAPES for p in ("random", "hot", "dup")):
        cases.append(dict(N=shape[0], d=shape[1], T=shape[2], bag=shape[3], pattern=pattern,
                          dtype=DTYPES[n % 3], deterministic=STRATEGIES[(n // 3) % 3],
                          idx_dtype=(torch.int32, torch.int64)[n % 2], target=TARGETS[n % 4]))
    return cases


@requires_cuda
@pytest.mark.parametrize("case", _gpu_cases(), ids=lambda c: "N{N}-d{d}-T{T}-bag{bag}-{pattern}-"
                         "{dtype}-{target}-{deterministic}".format(**c))
def test_gpu_matches_reference(case, nan_empty):
    check_case("cuda", **case)


@requires_cuda
@pytest.mark.parametrize("target", TARGETS + ["frozen"])
@pytest.mark.parametrize("deterministic", STRATEGIES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_gpu_targets_and_strategies(target, deterministic, w_dtype, nan_empty):
    check_case("cuda", N=1000, d=200, T=257, bag=64, dtype=torch.bfloat16, pattern="dup",
               target=target, deterministic=deterministic, w_dtype=w_dtype, seed=3)


@requires_cuda
def test_gpu_split_hot_rows(monkeypatch, nan_empty):
    monkeypatch.setattr(eb, "SEGMENT_CHUNK", 7)  # many split runs and folds
    for pattern in ("hot", "dup", "random"):
        check_case("cuda", N=50, d=300, T=128, bag=32, pattern=pattern, target="main_grad", seed=5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_deferred_table_grad(dtype, nan_empty):
    check_deferred("cuda", N=5000, d=1000, T=300, bag=128, lookups=6, dtype=dtype, seed=9)


@requires_cuda
def test_gpu_segment_is_deterministic():
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 64, (512, 128), generator=gen).cuda()
    idx[:, :64] = 3                                   # a hot row split over many programs
    w = torch.rand(512, 128, generator=gen).cuda()
    g = torch.randn(512, 256, generator=gen).cuda()
    results = []
    for _ in range(2):
        p = torch.nn.Parameter(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).cuda())
        p.main_grad = torch.zeros(64, 256, device="cuda")
        wt = w.clone().requires_grad_()
        eb.triton_embedding_bag(p, idx, wt, deterministic=True).backward(g)
        results.append((p.main_grad.clone(), wt.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@requires_cuda
def test_gpu_dispatch_uses_triton(monkeypatch):
    seen = []
    real = eb.triton_embedding_bag
    monkeypatch.setattr(eb, "triton_embedding_bag", lambda *a, **k: seen.append(1) or real(*a, **k))
    v, i, w = (t.cuda() for t in _good())
    torch.testing.assert_close(kernels.embedding_bag(v, i, w), embedding_bag_reference(v, i, w))
    kernels.force_reference(True)
    try:
        kernels.embedding_bag(v, i, w)
    finally:
        kernels.force_reference(False)
    assert seen == [1]


@requires_cuda
def test_gpu_64bit_offsets():
    """N*d > 2**31 elements: rows past 2**31 / d must be read and written at the right place."""
    N, d = (1 << 22) + 3, 520
    need = N * d * (2 + 4) + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free")
    gen = torch.Generator().manual_seed(11)
    rows = torch.tensor([0, N - 1, N - 2, (1 << 31) // d + 1, N // 2, N - 1], dtype=torch.int64)
    idx = rows[torch.randint(0, rows.numel(), (8, 16), generator=gen)]
    w = torch.rand(8, 16, generator=gen)
    g = torch.randn(8, d, generator=gen).bfloat16()
    local = torch.searchsorted(rows.unique(), idx)          # the same bags on a small table
    uniq = rows.unique()
    small = torch.randn(uniq.numel(), d, generator=gen).bfloat16()
    small64 = small.double().requires_grad_()
    want = embedding_bag_reference(small64, local, w.double())
    want_grad = torch.autograd.grad(want, small64, g.double())[0]
    for deterministic in (True, False):
        table = torch.nn.Parameter(torch.zeros(N, d, dtype=torch.bfloat16, device="cuda"))
        table.data[uniq.cuda()] = small.cuda()
        table.main_grad = torch.zeros(N, d, device="cuda")
        out = eb.triton_embedding_bag(table, idx.cuda(), w.cuda(), deterministic=deterministic)
        assert rel_err(out, want) <= 1e-2
        out.backward(g.cuda())
        assert rel_err(table.main_grad[uniq.cuda()], want_grad) <= 1e-5
        assert table.main_grad.abs().sum().item() == pytest.approx(
            want_grad.abs().sum().item(), rel=1e-4)           # nothing written elsewhere
        del table, out
        torch.cuda.empty_cache()
