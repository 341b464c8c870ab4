# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Plain-torch references of the two memory ops; autograd gives their backward.

They define the semantics the Triton kernels must match and run wherever torch runs (CPU, any
GPU, float64 for gradcheck). They are written for clarity, not speed: the lookup materialises a
[T, bag, d] gather and the search materialises all [T, H, 2, n_keys] scores.
"""
from __future__ import annotations

import torch


def embedding_bag_reference(values: torch.Tensor, indices: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of value rows per token.

    values [N, d] (any float dtype), indices [T, bag] (int32/int64), weights [T, bag] (float)
    -> out [T, d] in values.dtype, accumulated in float32 (float64 stays float64).
    """
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    # index_select, not values[indices]: the gradient of advanced indexing is index_put_ with
    # accumulate=True, which on a multi-threaded CPU adds float rows with atomics in thread order,
    # so two same-seed runs drifted apart (issue 30); index_select's gradient, index_add_, adds
    # in index order on the CPU (and is faster there), and both give the same forward.
    rows = values.index_select(0, indices.reshape(-1).long()).view(*indices.shape, -1).to(acc)
    out = torch.einsum("tb,tbd->td", weights.to(acc), rows)
    return out.to(values.dtype)


def product_key_search_reference(query: torch.Tensor, keys: torch.Tensor, k: int):
    """Exact top-k over the n_keys**2 product keys, per token and head.

    query [T, H, 2, half], keys [H, 2, n_keys, half] (already normalised/scaled as the layer
    wants) -> scores [T, H, k] float32 (float64 stays float64), descending, and
    indices [T, H, k] int64 = i * n_keys + j where i indexes the first half's sub-keys.

    The best k sums s1[i] + s2[j] always have i in top-k(s1) and j in top-k(s2), so searching
    the k x k candidate sums is exact.
    """
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    n_keys = keys.shape[2]
    s = torch.einsum("thcd,hcnd->thcn", query.to(acc), keys.to(acc))   # [T, H, 2, n_keys]
    top_s, top_i = s.topk(k, dim=-1)                                   # [T, H, 2, k]
    cand = top_s[:, :, 0, :, None] + top_s[:, :, 1, None, :]           # [T, H, k, k]
    scores, flat = cand.flatten(-2).topk(k, dim=-1)                    # [T, H, k]
    i1 = top_i[:, :, 0].gather(-1, torch.div(flat, k, rounding_mode="floor"))
    i2 = top_i[:, :, 1].gather(-1, flat % k)
    return scores, i1 * n_keys + i2


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for the softmax and norms (bf16 would quantise near-equal scores); float64 kept."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def score_softmax(scores: torch.Tensor) -> torch.Tensor:
    """The layer's weights: softmax over the k scores of each (token, head), in ``acc_dtype``."""
    return torch.softmax(scores.to(acc_dtype(scores)), dim=-1)
