# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""No host sync on the memory layer's training path (GPU only; skips on CPU).

At micro-batch 1 a training step is launch bound, and a host sync (``.item()``, a
data-dependent output size) drains the launch queue in the middle of it (benchmarks/RESULTS.md,
run 8). After a warm-up call (Triton compiles, the search's rank-pair table is cached), each
test runs forward + backward under ``torch.cuda.set_sync_debug_mode("error")``, which raises on
any synchronising CUDA call torch makes: the lookup (both strategies, every gradient target,
split hot rows), the three search backends, a whole Memory+ layer with query BatchNorm, key
usage and the end-of-step statistics, and (two GPUs, NCCL) the tensor-parallel layer with its
all-gather / all-to-all path and gradient reductions. Results are checked against the torch
reference path so that a sync-free but wrong plan fails too. The CPU side of the same property
is tests/kernels/test_segment_plan.py.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_memory import kernels
from megatron_memory.config import MemoryConfig
from megatron_memory.model.layer import MemoryPlus
from megatron_memory.training.metrics import KeyUsage
from megatron_memory.model.gpt import build_values
from megatron_memory.model.parallel import finish_query_norm_step, reduce_tp_partial_grads
from megatron_memory.kernels.reference import embedding_bag_reference, product_key_search_reference
from tests.conftest import requires_cuda, tiny_transformer_config
from tests.kernels.test_embedding_bag import rel_err

from megatron_memory.kernels import triton_embedding_bag as eb


@contextlib.contextmanager
def sync_errors():
    """Any synchronising CUDA call inside raises RuntimeError."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _lookup_inputs(seed: int, N=300, d=200, T=96, bag=32):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (T, bag), generator=gen)
    idx[:, :8] = 5                       # a row used T*8 times: split over chunks, then folded
    V = torch.randn(N, d, generator=gen).bfloat16()
    return V, idx, torch.rand(T, bag, generator=gen), torch.randn(T, d, generator=gen).bfloat16()


def _lookup_step(V, idx, w, g, target, deterministic):
    """One forward + backward of CUDA inputs (copied here on the device: a copy from host
    memory would itself sync) -> (out, weight grads, table gradient or None)."""
    table = torch.nn.Parameter(V.clone(), requires_grad=target != "frozen")
    if target == "main_grad":
        table.main_grad = torch.zeros(V.shape, device="cuda")
    elif target == "plain":
        table = V.clone().requires_grad_()
    wt = w.clone().requires_grad_()
    out = eb.triton_embedding_bag(table, idx, wt, deterministic=deterministic)
    out.backward(g)
    grad = table.main_grad if target == "main_grad" else table.grad
    return out, wt.grad, grad


@requires_cuda
@pytest.mark.parametrize("target", ["main_grad", "grad_none", "plain", "frozen"])
@pytest.mark.parametrize("deterministic", [None, False])
def test_gpu_lookup_has_no_host_sync(monkeypatch, target, deterministic):
    monkeypatch.setattr(eb, "SEGMENT_CHUNK", 16)   # many split runs and folds at this size
    V, idx, w, g = _lookup_inputs(seed=1)
    on_gpu = [t.cuda() for t in (V, idx, w, g)]
    warm = _lookup_step(*on_gpu, target, deterministic)
    with sync_errors():
        out, grad_w, grad_v = _lookup_step(*on_gpu, target, deterministic)
    Vr, wr = V.double().requires_grad_(), w.double().requires_grad_()
    embedding_bag_reference(Vr, idx, wr).backward(g.double())
    assert rel_err(out, embedding_bag_reference(V.double(), idx, w.double())) <= 1e-2
    assert rel_err(grad_w, wr.grad) <= 1e-5
    if target == "frozen":
        assert grad_v is None
    else:
        assert rel_err(grad_v, Vr.grad) <= (1e-5 if grad_v.dtype == torch.float32 else 1e-2)
    if deterministic is None and grad_v is not None:   # segment: bit-reproducible
        assert torch.equal(grad_v, warm[2]) and torch.equal(grad_w, warm[1])


@requires_cuda
@pytest.mark.parametrize("backend", kernels.SEARCH_BACKENDS)
def test_gpu_search_has_no_host_sync(backend):
    gen = torch.Generator().manual_seed(2)
    T, H, n, half, k = 64, 2, 32, 32, 8
    q = torch.randn(T, H, 2, half, generator=gen)
    K = torch.randn(H, 2, n, half, generator=gen) * half ** -0.5
    g = torch.randn(T, H, k, generator=gen)
    qg, kg, gg = q.cuda(), K.cuda(), g.cuda()

    def step():
        qc, kc = qg.clone().requires_grad_(), kg.clone().requires_grad_()
        scores, indices = kernels.product_key_search(qc, kc, k, backend=backend)
        scores.backward(gg)
        return scores, indices, qc.grad, kc.grad

    step()
    with sync_errors():
        scores, indices, dq, dk = step()
    qr, kr = q.double().requires_grad_(), K.double().requires_grad_()
    ref_scores, ref_indices = product_key_search_reference(qr, kr, k)
    ref_scores.backward(g.double())
    assert torch.equal(indices.cpu(), ref_indices)
    tol = 2e-2 if backend == "bf16" else 1e-5       # bf16 search: bf16 gradient GEMMs
    assert rel_err(scores, ref_scores) <= 1e-5
    assert rel_err(dq, qr.grad) <= tol and rel_err(dk, kr.grad) <= tol


def _gpu_layer(mc: MemoryConfig, d: int, seed: int, tp: int = 1, sp: bool = False):
    """bf16 Memory+ layer and its table (TP-sharded when tp > 1) on the current GPU, the
    table's gradient going to an fp32 main_grad as under Megatron DDP."""
    cfg = tiny_transformer_config(hidden_size=d, params_dtype=torch.bfloat16, bf16=True,
                                  use_cpu_initialization=False, tensor_model_parallel_size=tp,
                                  sequence_parallel=sp)
    torch.manual_seed(seed)
    values = build_values(cfg, mc)
    layer = MemoryPlus(cfg, mc, values, layer_id=1)
    values.weight.main_grad = torch.zeros(values.weight.shape, device="cuda")
    return layer, values


def _layer_step(layer, values, x, g):
    """Forward + backward + the end-of-step reductions -> (out, x grad, table main_grad)."""
    values.weight.main_grad.zero_()
    xc = x.clone().requires_grad_()
    out, _ = layer(xc)
    out.backward(g)
    reduce_tp_partial_grads([layer])
    finish_query_norm_step([layer])
    return out, xc.grad, values.weight.main_grad


LAYER_CONFIGS = [dict(query_norm="batchnorm"), dict(query_norm="center", qk_norm=False),
                 dict(query_norm="none", plus=False)]


@requires_cuda
@pytest.mark.parametrize("extra", LAYER_CONFIGS, ids=lambda e: "-".join(map(str, e.values())))
def test_gpu_memory_layer_has_no_host_sync(extra):
    d = 64
    mc = MemoryConfig(n_keys=32, heads=2, k=8, k_dim=32, **extra)
    layer, values = _gpu_layer(mc, d, seed=3)
    layer.key_usage = KeyUsage(mc.num_values, "cuda")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 4, d, generator=gen).bfloat16().cuda()
    g = torch.randn(16, 4, d, generator=gen).bfloat16().cuda()
    _layer_step(layer, values, x, g)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with sync_errors():
        out, dx, table_grad = _layer_step(layer, values, x, g)
    # The same step on the torch reference ops, from the same state (running statistics too).
    layer.load_state_dict(state)
    layer.key_usage = None
    kernels.force_reference(True)
    try:
        xr = x.clone().requires_grad_()
        ref_out, _ = layer(xr)
        ref_out.backward(g)
    finally:
        kernels.force_reference(False)
    assert rel_err(out, ref_out) <= 2e-2 and rel_err(dx, xr.grad) <= 3e-2
    assert rel_err(table_grad, values.weight.grad) <= 2e-2


# ------------------------------------------------------------------------------------------
# Two GPUs: the tensor-parallel layer (NCCL)
# ------------------------------------------------------------------------------------------

def _tp_worker(rank: int, world: int, store: str, sp: bool) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=world)
        d, s, b = 64, 16, 2
        layer, values = _gpu_layer(MemoryConfig(n_keys=32, heads=2, k=8, k_dim=32), d, seed=5,
                                   tp=world, sp=sp)
        gen = torch.Generator().manual_seed(6)   # the same full batch on every rank
        x = torch.randn(s, b, d, generator=gen).bfloat16().cuda()
        g = torch.randn(s, b, d, generator=gen).bfloat16().cuda()
        if sp:  # each rank holds its sequence share
            x, g = (t.chunk(world)[rank].contiguous() for t in (x, g))
        _layer_step(layer, values, x, g)
        with sync_errors():
            out, dx, _ = _layer_step(layer, values, x, g)
        assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


@requires_cuda
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_gpu_tp2_layer_has_no_host_sync(sp):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(
            _tp_worker, args=(2, os.path.join(tmp, "store"), sp), nprocs=2, join=True,
            start_method="spawn")
