# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Overlapped DP communication (grad reduce in backward, param all-gather in forward) trains
exactly like the synchronous path, on gloo with DP=2, two micro-batches per step and the
distributed optimizer, with buckets small enough that the table and the layers fall into many
bucket groups (megatron-core chains their all-gathers in forward order: a table read by a plain
method call instead of a module call broke the chain on GPU), for both ways a lookup can hand over the table gradient: returned to
autograd (the CPU reference) and accumulated into ``main_grad`` with None returned (the Triton
contract, mimicked here in torch), where only ``MemoryDDP``'s hook marks the table ready."""
from __future__ import annotations

import json

import torch

from tests.parallel import workers
from tests.parallel.dist_utils import run_ranks

STEPS = 3


class _MainGradLookup(torch.autograd.Function):
    """The Triton lookup's gradient contract in plain torch: the table gradient goes into the
    Parameter's main_grad, autograd gets None for it."""

    @staticmethod
    def forward(ctx, values, indices, weights):
        ctx.save_for_backward(values, indices, weights)
        ctx.param = values
        rows = values[indices].float()
        return torch.einsum("tb,tbd->td", weights.float(), rows).to(values.dtype)

    @staticmethod
    def backward(ctx, grad):
        values, indices, weights = ctx.saved_tensors
        contrib = weights.float()[:, :, None] * grad.float()[:, None, :]          # [T, bag, d]
        ctx.param.main_grad.index_add_(0, indices.reshape(-1), contrib.reshape(-1, grad.shape[1]))
        grad_w = torch.einsum("td,tbd->tb", grad.float(), values[indices].float())
        return None, None, grad_w.to(weights.dtype)


def _main_grad_lookup(values, indices, weights):
    return _MainGradLookup.apply(values, indices, weights)


def _train(runs: list) -> None:
    """Train each (cfg, out_file, main_grad_lookup) in turn in these ranks (one spawn for all)."""
    from megatron_memory import kernels

    reference = kernels.embedding_bag
    for cfg, out_file, main_grad_lookup in runs:
        kernels.embedding_bag = _main_grad_lookup if main_grad_lookup else reference
        workers.train(cfg, out_file)


def test_overlap_equals_synchronous(tmp_path):
    runs = [(workers.tiny_config(steps=STEPS, dp_batch=2, **{"train.global_batch_size": 8,
                                                             "train.overlap_comm": overlap,
                                                             "train.ddp_bucket_size": 3000}),
             str(tmp_path / f"overlap{overlap}_maingrad{main_grad}.json"), main_grad)
            for main_grad in (False, True) for overlap in (False, True)]
    run_ranks(2, _train, runs, tp=0)
    out = {}
    for cfg, name, main_grad in runs:
        out[cfg.train.overlap_comm, main_grad] = json.load(open(name))
        out[cfg.train.overlap_comm, main_grad]["table"] = torch.load(f"{name}.values0")["weight"]
    for main_grad in (False, True):
        on, off = out[True, main_grad], out[False, main_grad]
        assert len(on["losses"]) == STEPS
        torch.testing.assert_close(torch.tensor(on["losses"]), torch.tensor(off["losses"]),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.tensor(on["value_grad_norms"]),
                                   torch.tensor(off["value_grad_norms"]), rtol=1e-5, atol=0)
        assert all(v > 0 for v in on["value_grad_norms"])
        # The last update is in the weights (the overlapped all-gather is flushed at the end).
        torch.testing.assert_close(on["table"], off["table"], rtol=1e-5, atol=1e-7)
