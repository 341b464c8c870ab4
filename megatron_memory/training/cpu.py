# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Run real Megatron-Core on a machine without CUDA (tests, CI, the tiny default job).

Megatron-Core 0.19.2 assumes CUDA in a handful of places;
each shim below points one of them at the CPU. They touch private names, which is why
megatron-core is pinned, and they are active only when CUDA is unavailable and only inside
``cpu_shims()`` (the Trainer's entry points, ``on_cpu_shims``): code outside runs unpatched.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import megatron.core.fusions.fused_softmax as msoftmax
import megatron.core.optimizer.optimizer as mopt
import megatron.core.tensor_parallel.random as mrandom
import megatron.core.transformer.utils as mutils
import torch


class _NoStream:
    """Stands in for torch.cuda.current_stream() in DDP's grad sync (0.19.x)."""

    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites literal device='cuda' factory kwargs (schedules, optimizer) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "cuda" in str(kwargs.get("device", "")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


def _clip_grads_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grad_by_total_norm_fp32 without its 'torch.cuda.FloatTensor' assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def _type_with_cuda_names(original):
    """The distributed optimizer compares param.type() with 'torch.cuda.*Tensor' strings."""

    def type_(self, *a, **k):
        out = original(self, *a, **k)
        if not a and not k and isinstance(out, str) and out.startswith("torch.") \
                and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out

    return type_


def _causal_mask_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) of every shim."""
    cuda = torch.cuda
    return [
        (cuda, "current_device", lambda: "cpu"),
        (cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state()),
        (cuda.random, "get_rng_state", lambda device="cuda": torch.get_rng_state()),
        (cuda, "manual_seed", lambda seed: torch.manual_seed(seed)),
        (cuda, "synchronize", lambda *a, **k: None),
        (cuda, "current_stream", lambda *a, **k: _NoStream()),
        # Activation recompute replays the forward inside autograd, outside the thread-local
        # _CudaToCpu mode, so this literal device="cuda" needs its own shim.
        (mutils, "get_default_causal_mask", _causal_mask_cpu),
        (msoftmax, "get_default_causal_mask", _causal_mask_cpu),
        (mrandom, "_set_cuda_rng_state",
         lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)),
        (mopt, "clip_grad_by_total_norm_fp32", _clip_grads_cpu),
        (torch.Tensor, "type", _type_with_cuda_names(torch.Tensor.type)),
    ]


_depth = 0
_saved: list[tuple[object, str, object]] = []
_mode: Optional[_CudaToCpu] = None


@contextlib.contextmanager
def cpu_shims():
    """Megatron-Core runs on the CPU inside this block when CUDA is unavailable (a no-op with
    CUDA): the shims are set on entry and the originals restored on exit, so nothing else in the
    process runs patched. Re-entrant: nested blocks share the outermost one's shims. Yields
    whether the shims are active."""
    global _depth, _mode
    if torch.cuda.is_available():
        yield False
        return
    if _depth == 0:
        for owner, name, replacement in _patches():
            _saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)
        _mode = _CudaToCpu()
        _mode.__enter__()
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            _mode.__exit__(None, None, None)
            _mode = None
            while _saved:
                owner, name, original = _saved.pop()
                setattr(owner, name, original)


def on_cpu_shims(method):
    """Run ``method`` inside ``cpu_shims()`` (the Trainer's entry points)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with cpu_shims():
            return method(*args, **kwargs)

    return run
