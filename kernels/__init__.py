# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""The memory layer's two ops, dispatched to Triton on CUDA and to the torch reference elsewhere.

The layer calls only ``embedding_bag`` and ``product_key_search``; a faster implementation drops
in here without touching the layer. ``force_reference(True)`` (or MEGATRON_MEMORY_REFERENCE=1)
pins the reference, so tests can check both paths.

On CUDA the Triton ``embedding_bag`` accumulates a trainable table Parameter's gradient straight
into its ``main_grad`` (or ``.grad``) and returns None to autograd for it (kernels/README.md).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_memory.kernels.reference import (acc_dtype, embedding_bag_reference,
                                               product_key_search_reference, score_softmax)

try:  # Triton is optional: without it every op runs the reference.
    # Module imports (not their functions): kernels.triton_* must stay the submodules.
    from megatron_memory.kernels import triton_embedding_bag as _triton_bag
    from megatron_memory.kernels import bf16_search as _bf16_search
    from megatron_memory.kernels import triton_product_key as _triton_search
    from megatron_memory.kernels import query_prologue as _prologue
    from megatron_memory.kernels import query_norm_train as _query_norm_train
    from megatron_memory.kernels import decode_search as _decode_search
    from megatron_memory.kernels import key_norm as _key_norm
    from megatron_memory.kernels.triton_embedding_bag import DeferredTableGrad

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

_FORCE_REFERENCE = os.environ.get("MEGATRON_MEMORY_REFERENCE", "0") == "1"
# Which search runs on CUDA (``backend``; MemoryConfig.search). "bf16" (default): bf16
# tensor-core scores, candidates re-scored exactly in fp32 (kernels/bf16_search.py). "torch":
# the fp32 reference (matmul + topk; 4.3 ms forward at T=8192, H=4, n=1024 on an H200,
# 2026-11-26). "triton": the fused fp32 search (6.1 ms there; its in-register bitonic top-k
# merges dominate). With "bf16", calls of at most decode_search.MAX_TOKENS tokens that need no
# gradient (decode steps) take the exact fp32 search of kernels/decode_search.py, which splits
# the sub-keys across programs.
SEARCH_BACKENDS = ("bf16", "torch", "triton")


def force_reference(on: bool = True) -> None:
    """Route every op to the torch reference (True) or back to automatic dispatch (False)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = bool(on)


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton ops serve tensor t: Triton importable, t on CUDA, not forced off."""
    return HAVE_TRITON and t.is_cuda and not _FORCE_REFERENCE


def embedding_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_b weights[t, b] * values[indices[t, b]]; shapes [N, d], [T, bag], [T, bag] -> [T, d]."""
    if use_triton(values):
        return _triton_bag.triton_embedding_bag(values, indices, weights)
    return embedding_bag_reference(values, indices, weights)


def product_key_search(query: torch.Tensor, keys: torch.Tensor, k: int, *,
                       keys_bf16: Optional[torch.Tensor] = None, softmax: bool = False,
                       backend: str = "bf16", select: str = "threshold", rescore: str = "fused"):
    """Top-k product keys: query [T, H, 2, half], keys [H, 2, n, half] -> (scores, indices) [T, H, k].
    keys_bf16: optional cached ``keys.to(torch.bfloat16)`` for the bf16 search (inference);
    the other backends do not need it. softmax: (softmax of the scores per row, fp32 or fp64,
    indices); the bf16 search computes it in its product-step kernel and its backward.
    backend: the search on CUDA (SEARCH_BACKENDS; CPU always runs the reference); select,
    rescore: the bf16 search's candidate selection and re-scoring (bf16_search.SELECTS,
    RESCORES)."""
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"product_key_search: backend={backend!r}: choose one of "
                         f"{', '.join(SEARCH_BACKENDS)}")
    if use_triton(query) and backend == "bf16":
        if query.shape[0] <= _decode_search.MAX_TOKENS and not _needs_grad(query, keys):
            scores, indices = _decode_search.decode_product_key_search(query, keys, k)  # decode
        else:
            return _bf16_search.bf16_product_key_search(query, keys, k, keys_bf16=keys_bf16,
                                                        softmax=softmax, select=select,
                                                        rescore=rescore)
    elif use_triton(query) and backend == "triton":
        scores, indices = _triton_search.triton_product_key_search(query, keys, k)
    else:
        scores, indices = product_key_search_reference(query, keys, k)
    return (score_softmax(scores) if softmax else scores), indices


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused_query_prologue(q: torch.Tensor, gain: torch.Tensor, eps: float, half: int, norm: str = "none",
                         mean=None, scale=None, shift=None) -> Optional[torch.Tensor]:
    """Inference only: the query's running-statistics norm, QK-norm and gain in one Triton kernel
    (kernels/query_prologue.py), q [T, H*2*half] -> [T, H, 2, half] fp32. None when Triton does not
    serve q (CPU, reference forced) or autograd must reach an input: the caller runs its torch ops."""
    if not use_triton(q) or _needs_grad(q, gain, mean, scale, shift):
        return None
    return _prologue.triton_query_prologue(q, gain, eps, half, norm, mean, scale, shift)


def fused_key_norm(keys: torch.Tensor, eps: float):
    """The sub-keys' QK-norm for the search as one differentiable op (kernels/key_norm.py):
    keys [H, 2, n, half] -> (kn fp32 = rms_norm(keys) * half**-0.5, kb = kn in bf16, the bf16
    search's GEMM input); None when Triton does not serve keys (CPU, reference forced, fp64):
    the caller runs its torch ops."""
    if (not use_triton(keys) or keys.dtype not in _key_norm.DTYPES
            or keys.shape[-1] > _key_norm.MAX_HALF):
        return None
    return _key_norm.key_norm(keys, eps)


def fused_query_norm_train(q: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                           gain: torch.Tensor, bn_eps: float, qk_eps: float, half: int,
                           step_sums: torch.Tensor, keep: Optional[torch.Tensor] = None,
                           group=None) -> Optional[torch.Tensor]:
    """Training: the query BatchNorm over tokens (batch statistics, all-reduced over ``group``;
    this rank's sums added to ``step_sums``), QK-norm and gain as one differentiable op
    (kernels/query_norm_train.py), q [T, H*2*half] -> [T, H, 2, half] fp32. None when Triton does
    not serve q (CPU, reference forced, fp64): the caller runs its torch ops."""
    if not use_triton(q) or q.dtype not in _query_norm_train.DTYPES:
        return None
    return _query_norm_train.query_norm_train(q, bn_weight, bn_bias, gain, bn_eps, qk_eps, half,
                                              step_sums, keep, group)
