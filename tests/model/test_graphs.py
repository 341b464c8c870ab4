# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""CUDA graphs of a memory layer (megatron_memory/model/graphs.py) give the eager layer's results.

GPU (skips on CPU): a layer captured after two eager passes, then replayed on fresh inputs,
matches an eager copy of itself pass by pass:
- outputs and input gradients;
- every parameter's gradient accumulated in fp32 ``main_grad`` (the graph adds it there;
  Megatron DDP's hook adds the eager ``.grad``), and the table's gradient, deferred or per lookup;
- the query BatchNorm's step sums and the key-usage counts and moments.
Cases that must stay eager (a second forward before the first one's backward, another shape)
run eagerly with the same results. Two GPUs: the TP = 2 layer with SP, NCCL collectives inside
the graphs. CPU: the wrapper runs the eager layer.
"""
from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_memory import kernels
from megatron_memory.config import MemoryConfig
from megatron_memory.model.graphs import MemoryLayerGraph
from megatron_memory.model.layer import MemoryPlus, MemoryValues
from megatron_memory.training.metrics import KeyUsage
from tests.conftest import requires_cuda, tiny_transformer_config
from tests.kernels.test_embedding_bag import rel_err
from tests.model.test_no_host_sync import _gpu_layer

CONFIGS = [dict(query_norm="batchnorm"), dict(query_norm="center", qk_norm=False),
           dict(query_norm="none", plus=False)]


def _ddp_like(layer: MemoryPlus, values: MemoryValues) -> None:
    """fp32 ``main_grad`` on every parameter and the table (zeroed in place when present, as
    Megatron DDP's buffers are: the graphs write to them), and AccumulateGrad hooks that add a
    returned ``.grad`` into it and clear it, as Megatron DDP does (the node is kept on the
    parameter, so its hook lives as long as the parameter and is registered once)."""
    for p in list(layer.parameters()) + [values.weight]:
        if getattr(p, "main_grad", None) is not None:
            p.main_grad.zero_()
        else:
            p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if hasattr(p, "ddp_node"):
            continue
        p.ddp_node = p.view_as(p).grad_fn.next_functions[0][0]

        def hook(*_, p=p):
            if p.grad is not None:
                p.main_grad.add_(p.grad)
                p.grad = None

        p.ddp_node.register_hook(hook)


def _state(layer: MemoryPlus, values: MemoryValues) -> dict:
    """What a pass leaves behind: gradients, BatchNorm step sums, key-usage counts/moments."""
    deferred = getattr(values.weight, "memory_deferred_grad", None)
    if deferred is not None:
        deferred.fold(values.weight)
    out = {f"grad.{n}": p.main_grad.clone() for n, p in layer.named_parameters()}
    out["grad.table"] = values.weight.main_grad.clone()
    if layer.query_bn is not None:
        out["step_sums"] = layer.query_bn.step_sums.clone()
    out["counts"] = layer.key_usage.counts.clone()
    out["moments"] = layer.key_usage.moments.clone()
    return out


def _passes(layer, values, inputs, graphed: bool):
    """Forward + backward of each (x, g) -> [(out, x grad)] and the state after them."""
    _ddp_like(layer, values)
    layer.key_usage = KeyUsage(values.weight.shape[0], values.weight.device)
    if graphed:
        layer.cuda_graph = MemoryLayerGraph(layer, warmup=2)
    results = []
    for x, g in inputs:
        xc = x.clone().requires_grad_()
        out, _ = layer(xc)
        out.backward(g)
        results.append((out.detach().clone(), xc.grad.clone()))
    return results, _state(layer, values)


def _inputs(n: int, shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen).bfloat16().cuda(),
             torch.randn(*shape, generator=gen).bfloat16().cuda()) for _ in range(n)]


def _assert_same(eager, graphed, tol=5e-3):
    """Equal to bf16 rounding. A captured GEMM may take another cuBLAS algorithm than the eager
    one (another stream and workspace), so a bf16 result can differ by an ulp, and a sum of
    small gradients (the query bias's) by ~2e-3 relative; a stale or lost replay is O(1)."""
    (e_passes, e_state), (g_passes, g_state) = eager, graphed
    for i, ((eo, edx), (go, gdx)) in enumerate(zip(e_passes, g_passes)):
        assert rel_err(go, eo) <= tol and rel_err(gdx, edx) <= tol, f"pass {i}"
    assert e_state.keys() == g_state.keys()
    assert torch.equal(g_state.pop("counts"), e_state.pop("counts"))
    for key in e_state:
        assert rel_err(g_state[key], e_state[key]) <= tol, key
        assert g_state[key].abs().sum() > 0, key   # every gradient reached its buffer


@requires_cuda
@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "per-lookup"])
@pytest.mark.parametrize("extra", CONFIGS, ids=lambda e: "-".join(map(str, e.values())))
def test_gpu_graphed_layer_matches_eager(extra, deferred):
    mc = MemoryConfig(n_keys=32, heads=2, k=8, k_dim=32, **extra)
    inputs = _inputs(5, (16, 4, 64), seed=4)
    runs = []
    for graphed in (False, True):
        layer, values = _gpu_layer(mc, 64, seed=3)
        if deferred:
            values.weight.memory_deferred_grad = kernels.DeferredTableGrad()
        runs.append(_passes(layer, values, inputs, graphed))
    assert layer.cuda_graph.replays == 3    # passes 1-2 warm up, 3 captures and replays, 4-5
    _assert_same(*runs)


@requires_cuda
def test_gpu_passes_the_graphs_cannot_serve_run_eagerly():
    """A forward before the pending one's backward, and another shape, run eagerly, correctly."""
    mc = MemoryConfig(n_keys=32, heads=2, k=8, k_dim=32)
    warm = _inputs(3, (16, 4, 64), seed=5)
    (x1, g1), (x2, g2) = _inputs(2, (16, 4, 64), seed=6)
    (x3, g3), = _inputs(1, (8, 4, 64), seed=7)
    results = []
    for graphed in (False, True):
        layer, values = _gpu_layer(mc, 64, seed=3)
        values.weight.memory_deferred_grad = kernels.DeferredTableGrad()
        _, _ = _passes(layer, values, warm, graphed)      # graphed: captured at the third
        _ddp_like(layer, values)                          # zeroed buffers for what follows
        xs = [x.clone().requires_grad_() for x in (x1, x2, x3)]
        before = layer.cuda_graph.replays if graphed else 0
        outs = [layer(x)[0] for x in xs]                  # two in flight, then a new shape
        sum((o.float() * g.float()).sum() for o, g in zip(outs, (g1, g2, g3))).backward()
        if graphed:
            assert layer.cuda_graph.replays == before + 1 and not layer.cuda_graph.pending
        results.append(([(o.detach(), x.grad) for o, x in zip(outs, xs)], _state(layer, values)))
    _assert_same(*results)


@requires_cuda
def test_gpu_a_buffer_replaced_after_capture_is_one_clear_error():
    """The graphs write main_grad in place: a replaced one would be written after it was freed."""
    mc = MemoryConfig(n_keys=32, heads=2, k=8, k_dim=32)
    layer, values = _gpu_layer(mc, 64, seed=3)
    _passes(layer, values, _inputs(3, (16, 4, 64), seed=5), graphed=True)
    layer.w1.weight.main_grad = torch.zeros_like(layer.w1.weight.main_grad)
    with pytest.raises(RuntimeError, match="w1.weight.main_grad moved or changed after"):
        layer(torch.zeros(16, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True))


def test_graph_wrapper_runs_the_eager_layer_on_cpu():
    cfg = tiny_transformer_config(hidden_size=16)
    mc = MemoryConfig(n_keys=8, heads=2, k=4, k_dim=8)
    values = MemoryValues(cfg, mc)
    layer = MemoryPlus(cfg, mc, values, layer_id=0)
    x = torch.randn(6, 2, 16, requires_grad=True)
    ref, _ = layer(x)
    ref.sum().backward()
    ref_grad, x.grad = x.grad.clone(), None
    layer.cuda_graph = MemoryLayerGraph(layer)
    for _ in range(3):
        out, _ = layer(x)
        out.sum().backward()
        assert torch.equal(out, ref) and torch.equal(x.grad, ref_grad)
        x.grad = None
    assert layer.cuda_graph.fwd is None and layer.cuda_graph.replays == 0
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        MemoryLayerGraph(layer, warmup=0)


# ------------------------------------------------------------------------------------------
# Two GPUs: the tensor-parallel layer with sequence parallelism (NCCL inside the graphs)
# ------------------------------------------------------------------------------------------

def _tp_worker(rank: int, world: int, store: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=world)
        full = _inputs(5, (16, 2, 64), seed=8)        # the same batch on every rank
        inputs = [tuple(t.chunk(world)[rank].contiguous() for t in pair) for pair in full]
        runs = []
        for graphed in (False, True):
            layer, values = _gpu_layer(MemoryConfig(n_keys=32, heads=2, k=8, k_dim=32), 64,
                                       seed=5, tp=world, sp=True)
            values.weight.memory_deferred_grad = kernels.DeferredTableGrad()
            runs.append(_passes(layer, values, inputs, graphed))
        assert layer.cuda_graph.replays == 3
        _assert_same(*runs)
    finally:
        # NCCL's communicator cannot be destroyed while a graph that captured one of its
        # collectives is alive (pytorch/pytorch#115388): release first, as Trainer.close does.
        if "layer" in locals() and layer.cuda_graph is not None:
            layer.cuda_graph.release()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


@requires_cuda
def test_gpu_tp2_graphed_layer_matches_eager():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = torch.multiprocessing.start_processes(
            _tp_worker, args=(2, os.path.join(tmp, "store")), nprocs=2, join=False,
            start_method="spawn")
        deadline = time.monotonic() + 240    # a hang (e.g. at the group's destroy) fails, not blocks
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("the TP = 2 graphed-layer workers did not finish in 240 s")


@requires_cuda
def test_gpu_released_graphs_leave_the_layer_eager():
    """``release`` (Trainer.close, before the process group goes) frees the graphs; the passes
    after it run eagerly, with the eager layer's results, and never capture again."""
    mc = MemoryConfig(n_keys=32, heads=2, k=8, k_dim=32)
    inputs = _inputs(5, (16, 4, 64), seed=9)
    eager = _passes(*_gpu_layer(mc, 64, seed=3), inputs, graphed=False)
    layer, values = _gpu_layer(mc, 64, seed=3)
    first = _passes(layer, values, inputs[:3], graphed=True)       # captured at the third
    graph = layer.cuda_graph
    graph.release()
    assert graph.fwd is None and graph.bwd is None
    rest = []
    for x, g in inputs[3:]:
        xc = x.clone().requires_grad_()
        out, _ = layer(xc)
        out.backward(g)
        rest.append((out.detach().clone(), xc.grad.clone()))
    assert graph.fwd is None and graph.replays == 1
    state = _state(layer, values)
    _assert_same(eager, (first[0] + rest, state))
