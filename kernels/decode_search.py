# Copyright 2026 megatron-memory authors. Licensed under the Apache License, Version 2.0.
"""Exact fp32 product-key search for a few tokens (decode steps), forward only.

Shapes: query [T, H, 2, half], keys [H, 2, n, half] (fp32 or bf16/fp16, unit last stride) ->
scores [T, H, k] fp32 descending, indices [T, H, k] int64 = i * n + j; the contract of
``product_key_search`` without autograd.

Why a separate path: at T = 1 the bf16 search (kernels/bf16_search.py) is latency-bound on
an H100 (benchmarks/RESULTS.md), because each of its stages has only 2H * T programs (8 at the
paper's 4 heads) and long dependent chains (17 bisection rounds, a bitonic top-k) on them. Here
the n sub-keys of each (token, head, half) are split across programs instead:
  1. ``_chunk_topk_kernel``, program (t, h*2 + c, chunk of BLOCK_N sub-keys): exact fp32 scores
     of its sub-keys (fp32 products summed over the half width), their top K_PAD as packed
     (score, index) int64 keys (triton_product_key._pack). 128 programs at T = 1, n = 1024.
  2. ``_merge_kernel``, program (t, h*2 + c): top K_PAD of the n / BLOCK_N chunk lists.
  3. the product step of the fused search (triton_product_key._candidates_kernel).
Every token re-reads the keys (2H * n * half * 4 bytes, from L2 after the first), so this pays
only for small T; ``MAX_TOKENS`` is where the dispatcher switches (measured in bench_search.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_memory.kernels.triton_product_key import _check, _pack, _row_dots, _store_top, half_lists, product_step

# The dispatcher (kernels.product_key_search) takes this path for T <= MAX_TOKENS when no
# gradient is needed.
MAX_TOKENS = 4   # H100: faster than the bf16 search at T = 1..4, slower at T = 16


@triton.jit
def _chunk_topk_kernel(q, keys, part, n, half, n_chunks,
                       stride_qt, stride_qh, stride_qc, stride_kh, stride_kc, stride_kn,
                       K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (t, hc, chunk): part[(t*2H + hc) * n_chunks + chunk, :] = top K_PAD packed keys of
    the sub-keys chunk*BLOCK_N .. +BLOCK_N-1 (padding below every real key)."""
    t = tl.program_id(0).to(tl.int64)
    hc = tl.program_id(1)
    chunk = tl.program_id(2)
    h = hc // 2
    c = hc % 2
    ns = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < n
    q_row = q + t * stride_qt + h * stride_qh + c * stride_qc
    k_rows = keys + h * stride_kh + c * stride_kc + ns.to(tl.int64) * stride_kn
    acc = _row_dots(q_row, k_rows, nmask, half, BLOCK_N, BLOCK_D)
    key = tl.where(nmask, _pack(acc, ns), -9223372036854775808)
    row = (t * tl.num_programs(1) + hc) * n_chunks + chunk
    tl.store(part + row * K_PAD + tl.arange(0, K_PAD), tl.topk(key, K_PAD))


@triton.jit
def _merge_kernel(part, top_s, top_i, n_chunks, k, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (t, hc): the top K_PAD of the row's n_chunks lists -> top_s / top_i[t, h, c, :]
    (fp32 scores and int32 sub-key ids, descending; slots >= k written as zeros)."""
    row = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    es = tl.arange(0, BLOCK_C * K_PAD)
    key = tl.load(part + row * n_chunks * K_PAD + es, mask=es < n_chunks * K_PAD,
                  other=-9223372036854775808)
    _store_top(key, top_s, top_i, row, k, K_PAD)


def decode_config(half: int, k_pad: int) -> dict:
    """Tiles of _chunk_topk_kernel: [BLOCK_N, BLOCK_D] fp32 values and their int64 addresses in
    registers (4096 of each at the layer's sizes; 4 warps, no spills on sm_90: the kernel test
    compiles it); BLOCK_N >= K_PAD for the chunk's top-k. 64 x 64 was the fastest at T = 1 and
    4 of 27 tilings swept on an H100 (bench_search.py --profile; benchmarks/RESULTS.md)."""
    return dict(BLOCK_N=max(64, k_pad), BLOCK_D=max(16, min(64, triton.next_power_of_2(half))),
                num_warps=4)


def decode_product_key_search(query: torch.Tensor, keys: torch.Tensor, k: int, config=None):
    """Top-k product keys for few tokens, exact fp32, no autograd (module docstring)."""
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad):
        raise ValueError("decode_product_key_search has no backward: call it under torch.no_grad(), "
                         "or use product_key_search")
    _check(query, keys, k)
    query, keys = query.contiguous(), keys.contiguous()
    T, H, _, half = query.shape
    n = keys.shape[2]
    top_s, top_i = half_lists(T, H, k, query.device)
    k_pad = top_s.shape[-1]
    if T and H:
        cfg = dict(config or decode_config(half, k_pad))
        n_chunks = triton.cdiv(n, cfg["BLOCK_N"])
        part = torch.empty(T * 2 * H * n_chunks, k_pad, dtype=torch.int64, device=query.device)
        _chunk_topk_kernel[(T, 2 * H, n_chunks)](
            query, keys, part, n, half, n_chunks, query.stride(0), query.stride(1), query.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2), K_PAD=k_pad, **cfg)
        _merge_kernel[(T, 2 * H)](part, top_s, top_i, n_chunks, k, K_PAD=k_pad,
                                  BLOCK_C=triton.next_power_of_2(n_chunks), num_warps=4)
    return product_step(top_s, top_i, n, k)
