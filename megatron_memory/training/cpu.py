# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Run real Megatron-Core on a machine without CUDA (tests, CI, the tiny default job).

Megatron-Core 0.19.2 assumes CUDA in a handful of places;
each shim below points one of them at the CPU. They touch private names, which is why
megatron-core is pinned, and they are installed only when CUDA is unavailable.
"""
from __future__ import annotations

import megatron.core.fusions.fused_softmax as msoftmax
import megatron.core.optimizer.optimizer as mopt
import megatron.core.tensor_parallel.random as mrandom
import megatron.core.transformer.utils as mutils
import torch

_INSTALLED = False


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


def _cuda_type_strings():
    """The distributed optimizer compares param.type() with 'torch.cuda.*Tensor' strings."""
    original = torch.Tensor.type

    def type_(self, *a, **k):
        out = original(self, *a, **k)
        if not a and not k and isinstance(out, str) and out.startswith("torch.") \
                and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out

    torch.Tensor.type = type_


def install_cpu_shims() -> bool:
    """Install every shim once; returns True when they are active (no CUDA)."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    _CudaToCpu().__enter__()

    # Activation recompute replays the forward inside autograd, outside the thread-local
    # _CudaToCpu mode, so this literal device="cuda" needs its own shim.
    def causal_mask_cpu(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    mutils.get_default_causal_mask = msoftmax.get_default_causal_mask = causal_mask_cpu

    mrandom._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    mopt.clip_grad_by_total_norm_fp32 = _clip_grads_cpu
    _cuda_type_strings()
    _INSTALLED = True
    return True
