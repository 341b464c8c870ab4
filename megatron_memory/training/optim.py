# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""torch AdamW inside Megatron's optimizer wrappers: the fused implementation and per-parameter
step counters.

Without Apex or Transformer Engine, megatron-core 0.19.2 builds ``torch.optim.AdamW`` with its
default, the foreach implementation: about ten elementwise passes over every fp32 state tensor
per step. For the value table that is the largest fixed cost of a step (at the 8B width the
optimizer step measured well over twice the dense model's; see benchmarks/RESULTS.md): the
table's 2^20 x 2048 fp32 slice per rank is read and written many times over. torch's fused AdamW
(one kernel per device and dtype, CUDA and CPU) reads the parameter, gradient and both moments
once and writes them once. Megatron gives no way to ask for it, so it is switched on in place,
after the optimizer is built and again after a checkpoint load (torch's ``load_state_dict``
takes the saved param-group options, which may predate it).
"""
from __future__ import annotations

import torch

_TORCH_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam/AdamW instances inside a Megatron (chained) optimizer; Apex/TE optimizers
    (already fused) are left out."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [o for o in inner if isinstance(o, _TORCH_ADAM)]


def _params(opt: torch.optim.Optimizer):
    return [p for g in opt.param_groups for p in g["params"]]


def fused_supported(opt: torch.optim.Optimizer) -> bool:
    """torch's fused kernels take floating-point parameters on CUDA or CPU (also XPU/MPS, which
    this project does not run on)."""
    return all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in _params(opt))


def configure_adam(optimizer, fused: bool) -> list[str]:
    """Set every torch Adam of ``optimizer`` to the fused (or foreach) implementation and give
    each parameter its own ``step`` tensor where the fused kernels want it (float32, on the
    parameter's device). Returns one line per optimizer that could not be fused (empty if all
    were)."""
    problems = []
    for opt in torch_adams(optimizer):
        use = fused and fused_supported(opt)
        if fused and not use:
            problems.append(f"{type(opt).__name__}: a parameter is not floating point on CUDA/CPU")
        for group in opt.param_groups:
            group["fused"], group["foreach"] = use, (None if use else group.get("foreach"))
        opt.defaults["fused"] = use
        unshare_steps(opt, to_device=use)
    return problems


def unshare_steps(opt: torch.optim.Optimizer, to_device: bool) -> None:
    """megatron-core 0.19.2's distributed optimizer (without Apex/TE) restores torch Adam's
    per-parameter "step" as ONE tensor shared by every parameter; Adam then increments it once
    per parameter per step, which corrupts the bias correction after a resume. Give each
    parameter its own copy; with ``to_device`` on the parameter's device as float32 (the fused
    kernels increment the steps on the device, and a CPU step beside CUDA tensors fails)."""
    for param, state in opt.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = (step.to(device=param.device, dtype=torch.float32, copy=True) if to_device
                             else step.clone())
