# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""configure_adam: torch AdamW inside Megatron-style wrappers switched to the fused kernels, with
one step tensor per parameter (the Trainer-level checks are in test_resume: fused before and
after a load, bit-identical resume)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_memory.training.optim import configure_adam, torch_adams


def _wrapped(steps: int = 3):
    """A chained optimizer of two torch AdamWs (foreach, as megatron builds them) after a
    restore that left ONE step tensor shared by every parameter (megatron-core 0.19.2)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    opts = [torch.optim.AdamW(params[:2], lr=1e-2), torch.optim.AdamW(params[2:], lr=1e-2)]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        for o in opts:
            o.step()
    shared = torch.tensor(float(steps))
    for o in opts:
        for s in o.state.values():
            s["step"] = shared
    return params, SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=o) for o in opts])


def _step_all(params, wrapper, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    for o in torch_adams(wrapper):
        o.step()


def test_fused_matches_foreach_and_steps_are_unshared():
    grads = [torch.randn(5, 3) for _ in range(3)]
    fused_params, fused = _wrapped()
    ref_params, ref = _wrapped()
    assert configure_adam(fused, True) == []
    configure_adam(ref, False)
    adams = torch_adams(fused)
    assert [g["fused"] for o in adams for g in o.param_groups] == [True, True]
    assert [g["fused"] for o in torch_adams(ref) for g in o.param_groups] == [False, False]
    steps = [s["step"] for o in adams for s in o.state.values()]
    assert len({id(t) for t in steps}) == 3 and all(t.dtype == torch.float32 for t in steps)
    for _ in range(2):
        _step_all(fused_params, fused, grads)
        _step_all(ref_params, ref, grads)
    # every parameter's bias correction counts its own steps: 3 + 2, not 3 + 2 x 3
    assert all(float(s["step"]) == 5.0 for o in adams for s in o.state.values())
    for a, b in zip(fused_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # one kernel vs ten passes


def test_non_float_params_stay_foreach_with_a_reason():
    p = torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))
    wrapper = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=torch.optim.AdamW([p]))])
    problems = configure_adam(wrapper, True)
    assert len(problems) == 1 and "not floating point" in problems[0]
    assert torch_adams(wrapper)[0].param_groups[0]["fused"] is False
