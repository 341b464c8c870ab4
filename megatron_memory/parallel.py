# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Tensor-parallel plan of the memory layer (the single-device math is in ``layer.py``).

Each TP rank runs the query, product-key search, gating and W2 for its own share of the tokens
(with sequence parallelism these are the tokens it already holds; without, the layer scatters the
replicated sequence first and gathers the result at the end, so the search is never computed TP
times). Those layer parameters are replicated across TP and their gradients are summed over the
TP group by ``finalize_memory_grads``.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_config import TransformerConfig


def tp_world_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def split_tokens(hidden_states: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """[s, b, d] replicated over TP -> this rank's [s/TP, b, d] (identity with SP or TP=1)."""
    if tp_world_size() == 1 or config.sequence_parallel:
        return hidden_states
    return scatter_to_sequence_parallel_region(hidden_states)


def gather_tokens(out: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """Inverse of ``split_tokens``: [s/TP, b, d] -> [s, b, d] on every TP rank."""
    if tp_world_size() == 1 or config.sequence_parallel:
        return out
    return gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)


def mark_tp_partial(module: torch.nn.Module) -> None:
    """Flag a memory layer's own parameters: each TP rank sees a share of the tokens, so their
    gradients are partial sums that ``finalize_memory_grads`` adds up over the TP group."""
    for p in module.parameters():
        p.memory_tp_partial = True


def _reduce_tp_partial_grads(model_chunks) -> None:
    if tp_world_size() == 1:
        return
    grads = [p.main_grad for chunk in model_chunks for p in chunk.parameters()
             if getattr(p, "memory_tp_partial", False) and p.requires_grad
             and getattr(p, "main_grad", None) is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def finalize_memory_grads(model_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """Megatron's ``finalize_model_grads`` plus the memory layers' TP reductions; install it as
    ``TransformerConfig.finalize_model_grads_func``."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model_chunks, num_tokens, pg_collection=pg_collection,
                         force_all_reduce=force_all_reduce)
    _reduce_tp_partial_grads(model_chunks)
