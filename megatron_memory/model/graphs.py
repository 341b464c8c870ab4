# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""CUDA graphs of a memory layer's training pass (``train.cuda_graph_memory``).

Why: at micro-batch 1 a training step is bound by the host, not the GPU. One Memory+ pass
enqueues ~130 kernels: 16 Triton launches at ~22 us of host time each, autograd Functions at
~70 us, the TP collectives. That is 4-6 ms of host time for ~1 ms of GPU work (measured on
an H200, benchmarks/RESULTS.md). Two graphs per layer, its forward and its backward with the
weight-gradient accumulation, replace all of it with two graph launches and a few copies.

How: the recipe of ``torch.cuda.make_graphed_callables``, with the DDP side of Megatron's local
CUDA graphs (``megatron.core.transformer.cuda_graphs``):
- the first ``warmup`` training passes run eagerly (Triton compiles, cuBLAS and NCCL set-up,
  lazily created state such as the key-usage moments), and count only once their backward ran;
- the next pass captures the forward into a graph, then its backward (``torch.autograd.grad``
  into static tensors, with respect to views of the input and parameters made inside the
  capture: see ``_capture``). The backward graph also adds each parameter's gradient into its fp32
  ``main_grad``, as Megatron's fused-accumulation layers do, and returns None to autograd. Setting
  ``_cudagraph_wgrad_ready_event`` tells Megatron DDP's grad hook not to expect ``.grad``;
- later passes copy the input into the static input, replay, and return the static output;
  backward copies the output gradient in and replays.

Why capture is safe here: the training path has no host syncs (tests/model/test_no_host_sync.py),
TP split sizes never depend on data, and persistent state is updated in place (query BatchNorm
step sums, key-usage counts and moments, ``main_grad``). Two side effects live in Python, and they
are redone by hand after every backward replay:
- the deferred table-gradient record: it gets copies of the graph's static tensors, which the
  next replay overwrites;
- the table's ``memory_grad_ready_hook``.
During capture Megatron's capture flag is set, so DDP's hooks stay quiet as they do under its
own graphs. At replay the forward pre-hooks of the layer's submodules are run by hand, for DDP's
overlapped parameter all-gather.

Limits (such passes run eagerly, with the same results):
- one pass in flight per layer: a forward that comes before the previous one's backward runs
  eagerly, so pipeline schedules stay correct but gain little (the trainer requires PP = 1);
- the input shape, dtype and device are fixed at capture;
- no padding mask; grad enabled and training mode only.
``release`` destroys the graphs; the trainer calls it before the process group goes.
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from typing import Optional

import torch
from megatron.core.transformer import cuda_graphs as mcore_graphs

from megatron_memory.model.layer import MemoryPlus


class _Record:
    """Stands in for a table's DeferredTableGrad while the backward is captured: keeps the
    graph's static (grad_out, indices, weights) tensors, copied out after every replay."""

    def __init__(self):
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, grad_out, indices, weights, values=None) -> None:
        self.parts.append((grad_out, indices, weights))


@contextlib.contextmanager
def _capturing(table: torch.nn.Parameter):
    """Megatron's capture flag on (its DDP hooks return at once); the table's Python-side
    gradient effects swapped for a ``_Record`` and no ready hook. Yields the record."""
    record = _Record()
    saved = {name: getattr(table, name, None) for name in ("memory_deferred_grad",
                                                           "memory_grad_ready_hook")}
    if saved["memory_deferred_grad"] is not None:
        table.memory_deferred_grad = record
    table.memory_grad_ready_hook = None
    # No Python GC during capture: a collection could destroy an unreachable CUDA graph (or
    # free its pool), which is illegal while a stream captures and invalidates the capture.
    # torch no longer collects on entering torch.cuda.graph, so collect once here.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    mcore_graphs._set_capture_start()
    try:
        yield record
    finally:
        mcore_graphs._set_capture_end()
        if gc_was_enabled:
            gc.enable()
        for name, value in saved.items():
            setattr(table, name, value)


class _Replay(torch.autograd.Function):
    """forward(graph, x, table, *params) -> the static output; backward replays the backward
    graph. The table and the params are inputs so that autograd runs their AccumulateGrad nodes
    (DDP's grad-ready hooks) once per pass, as in the eager layer."""

    @staticmethod
    def forward(ctx, graph: "MemoryLayerGraph", x, table, *params):
        ctx.graph = graph
        return graph.replay_forward(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        dx, grads = ctx.graph.replay_backward(grad_out)
        return (None, dx, None, *grads)


class MemoryLayerGraph:
    """The forward and backward graphs of one ``MemoryPlus`` layer (``graph_memory_layers``
    sets them as ``layer.cuda_graph``).

    warmup: eager passes (forward and backward) before capture. The graphs keep their own memory
    pool: the layer's activations and backward temporaries at the captured shape, for the run.
    """

    def __init__(self, layer: MemoryPlus, warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"MemoryLayerGraph: warmup must be >= 1 (Triton compiles and NCCL "
                             f"set-up must happen before capture), got {warmup}")
        # weak: the layer holds this object (layer.cuda_graph); no cycle keeps either alive
        self._layer, self.warmup = weakref.ref(layer), warmup
        self.warm_backwards = 0
        self.key: Optional[tuple] = None   # (shape, dtype, device) the graphs serve
        self.fwd = self.bwd = None
        self.pending = False              # a replayed forward waits for its backward
        self.replays = 0                  # forward replays (tests and logs read it)
        self.params = [p for p in layer.parameters() if p.requires_grad]
        # Submodules whose forward pre-hooks a replay runs by hand (DDP's param all-gather wait).
        self.hooked = [m for m in layer.modules() if m is not layer] + [layer.values]

    @property
    def layer(self) -> MemoryPlus:
        return self._layer()

    # ---------------------------------------------------------------------------- dispatch

    def __call__(self, x: torch.Tensor, padding_mask=None) -> torch.Tensor:
        """The layer's output for x [s, b, d]: replayed when the graphs serve x, else eager."""
        layer = self.layer
        if not self._eligible(x, padding_mask):
            out = layer.eager_forward(x, padding_mask)
            if self.key is None and self._trainable(x):   # a warm-up pass: count its backward
                x.register_hook(self._count_backward)
            return out
        if self.fwd is None:
            self._capture(x)
        self._run_pre_hooks(x)
        table = layer.values.weight
        return _Replay.apply(self, x, table, *self.params)

    def _trainable(self, x) -> bool:
        return (self.layer.training and torch.is_grad_enabled() and x.is_cuda and x.requires_grad
                and not torch.cuda.is_current_stream_capturing())

    def _eligible(self, x, padding_mask) -> bool:
        if padding_mask is not None or self.pending or not self._trainable(x):
            return False
        key = (tuple(x.shape), x.dtype, x.device)
        if self.key is None:
            if self.warm_backwards < self.warmup:
                return False
            self.key = key
        return key == self.key

    def _count_backward(self, grad):
        self.warm_backwards += 1

    def _run_pre_hooks(self, x) -> None:
        for m in self.hooked:
            for hook in tuple(m._forward_pre_hooks.values()):
                hook(m, (x,))

    def release(self) -> None:
        """Destroy the graphs and free their memory pool; later passes run eagerly (no new
        capture). Call before destroying the process group: NCCL's ncclCommDestroy waits until
        every CUDA graph that captured one of the communicator's collectives is gone, so a graph
        still alive then hangs the exit (pytorch/pytorch#115388)."""
        if self.fwd is not None:
            torch.cuda.synchronize()   # a replay may still run
            self.fwd.reset()
            self.bwd.reset()
        self.fwd = self.bwd = None
        self.static_x = self.static_out = self.static_dout = self.static_dx = None
        self.static_grads, self.record = [], []
        self.key = ("released",)   # matches no input: every later pass is eager
        self.pending = False

    # ----------------------------------------------------------------------------- capture

    def _capture(self, x: torch.Tensor) -> None:
        layer, table = self.layer, self.layer.values.weight
        if getattr(table, "main_grad", None) is None:
            raise RuntimeError(
                "CUDA graphs of a memory layer need the value table's gradient in main_grad "
                "(Megatron DDP, or set values.weight.main_grad): a .grad created or dropped "
                "between replays would leave the graph writing freed memory")
        self.static_x = x.detach().clone()
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        names = [n for n, p in layer.named_parameters() if p.requires_grad]
        with _capturing(table) as record:
            with torch.cuda.graph(self.fwd):
                # Views made here stand for the input and the parameters. Autograd then stops
                # at them in the captured backward, without reaching the parameters'
                # AccumulateGrad nodes. Those nodes were created on the default stream and DDP
                # keeps them alive; syncing with that stream would invalidate the capture.
                inputs = [self.static_x.requires_grad_().view_as(self.static_x)]
                inputs += [p.view_as(p) for p in self.params]
                out, _ = torch.func.functional_call(layer, dict(zip(names, inputs[1:])),
                                                    (inputs[0],))
            self.static_out = out.detach()
            self.static_dout = torch.empty_like(out)
            with torch.cuda.graph(self.bwd, pool=self.fwd.pool()):
                grads = torch.autograd.grad(out, inputs, self.static_dout, allow_unused=True)
                returned = []
                for p, g in zip(self.params, grads[1:]):
                    main = getattr(p, "main_grad", None)
                    if g is not None and main is not None:
                        main.add_(g)   # fp32 accumulation in the graph; None goes to autograd
                        g = None
                    returned.append(g)
        self.static_dx, self.static_grads = grads[0], returned
        del out, grads, inputs
        self.record = record.parts
        self.ready = torch.cuda.Event()
        self.addresses = self._addresses()
        for p, g in zip(self.params, self.static_grads):
            if g is None and getattr(p, "main_grad", None) is not None:
                p._cudagraph_wgrad_ready_event = self.ready

    def _persistent(self) -> dict:
        """Every tensor the graphs read or write in place across replays, by name."""
        layer, table = self.layer, self.layer.values.weight
        out = {"values.weight": table, "values.weight.main_grad": table.main_grad}
        for name, p in layer.named_parameters():
            out[name] = p
            if getattr(p, "main_grad", None) is not None:
                out[name + ".main_grad"] = p.main_grad
        if layer.query_bn is not None:
            out["query_bn.step_sums"] = layer.query_bn.step_sums
        if layer.key_usage is not None:
            out["key_usage.counts"] = layer.key_usage.counts
            out["key_usage.moments"] = layer.key_usage.moments
        return out

    def _addresses(self) -> dict:
        return {name: None if t is None else t.data_ptr() for name, t in self._persistent().items()}

    # ------------------------------------------------------------------------------ replay

    def replay_forward(self, x: torch.Tensor) -> torch.Tensor:
        now = self._addresses()
        if now != self.addresses:   # the graphs would write memory that is no longer these
            moved = sorted(k for k in now.keys() | self.addresses.keys()
                           if now.get(k) != self.addresses.get(k))
            raise RuntimeError(f"memory layer {self.layer.layer_id}: {', '.join(moved)} moved or "
                               "changed after its CUDA graphs were captured (update such tensors "
                               "in place, as Megatron DDP and its optimizer do)")
        self.static_x.detach().copy_(x)
        self.fwd.replay()
        self.pending = True
        self.replays += 1
        return self.static_out.detach()   # a new tensor per pass: autograd sets its grad_fn

    def replay_backward(self, grad_out: torch.Tensor):
        self.static_dout.copy_(grad_out)
        self.bwd.replay()
        self.pending = False
        self.ready.record()
        table = self.layer.values.weight
        deferred = getattr(table, "memory_deferred_grad", None)
        if self.record and deferred is not None:
            for part in self.record:   # the next replay overwrites the static tensors
                deferred.add(*(t.clone() for t in part), table)
        elif callable(getattr(table, "memory_grad_ready_hook", None)):
            table.memory_grad_ready_hook()
        return self.static_dx.detach(), [None if g is None else g.detach() for g in self.static_grads]


def graph_memory_layers(model, warmup: int = 2) -> list[MemoryLayerGraph]:
    """Give every memory layer of ``model`` (a MemoryGPTModel) its CUDA graphs: each layer runs
    ``warmup`` eager passes, then replays. Returns them, in layer order."""
    graphs = []
    for layer in model.memory_layers():
        layer.cuda_graph = MemoryLayerGraph(layer, warmup)
        graphs.append(layer.cuda_graph)
    return graphs


def release_memory_layer_graphs(model) -> None:
    """Free the memory layers' CUDA graphs; later passes run eagerly. NCCL cannot destroy a
    communicator while a graph that captured one of its collectives is alive (a hang at exit,
    pytorch/pytorch#115388): call this before any process group goes."""
    for layer in model.memory_layers():
        if layer.cuda_graph is not None:
            layer.cuda_graph.release()
            layer.cuda_graph = None
